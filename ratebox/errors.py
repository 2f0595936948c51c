"""Exceptions that carry an exit status, and the exit statuses themselves."""

#: Everything went as asked.
EXIT_OK = 0
#: A runtime failure: a server could not be reached, a child could not boot, ...
EXIT_FAILURE = 1
#: Bad usage or bad configuration: the operator has to change something.
EXIT_USAGE = 2
#: A child that cannot boot at all (bad code, bad setup) exits with this, so the supervisor
#: can tell "cannot start" from "died while running" and does not respawn it in a loop.
EXIT_BOOT_FAILURE = 3


class RateboxError(Exception):
    """Base class: one clear line for the operator, and the status to exit with."""

    exit_status = EXIT_FAILURE


class ConfigError(RateboxError):
    """The configuration is wrong; the message names the key path."""

    exit_status = EXIT_USAGE


class UsageError(RateboxError):
    """The command line is wrong."""

    exit_status = EXIT_USAGE


class ServerUnavailable(RateboxError):
    """Redis or PostgreSQL cannot be reached (the message names which and where, masked)."""

    exit_status = EXIT_FAILURE
