"""RateBox Validator: validates contact and payment details from a Redis Stream into PostgreSQL."""

__version__ = "0.1.0"
