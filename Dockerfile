# RateBox Validator: one image for the supervisor and ratebox-migrate (see compose.yaml).
FROM python:3.11-slim

# hiredis, psycopg2-binary and the rest ship wheels: no compiler needed.
WORKDIR /srv/ratebox
COPY requirements.txt ./
RUN pip install --no-cache-dir -r requirements.txt \
    && useradd --system --home-dir /srv/ratebox --shell /usr/sbin/nologin ratebox

COPY bin/ bin/
COPY ratebox/ ratebox/
COPY schema/ schema/
COPY deploy/ratebox.compose.yaml /etc/ratebox/ratebox.yaml

USER ratebox
EXPOSE 9187
# TERM stops the supervisor gracefully (each worker finishes its batch).
STOPSIGNAL SIGTERM
CMD ["bin/ratebox-supervisor", "-c", "/etc/ratebox/ratebox.yaml"]
