# ankisync in a container: the standard library of Python 3.14 includes zstd,
# so the image needs nothing beyond the one file.
#
#   docker build -t ankisync .
#   docker run -d --name ankisync -p 27701:27701 -v ankisync-data:/data \
#       -e SYNC_USER1=alice:secret ankisync
#   docker exec -i ankisync python ankisync.py adduser bob   # password on stdin
#
# A host folder instead of a volume must be writable by the container's user, uid 10001:
# `chown 10001 DIR` before `-v DIR:/data`, or run with `--user $(id -u)`.
FROM python:3.14-slim

# A plain (not --system) user: uid 10001 is inside the range useradd expects for one.
RUN useradd --uid 10001 --no-create-home --home-dir /app --shell /usr/sbin/nologin \
        --no-log-init ankisync \
    && mkdir -p /data \
    && chown ankisync /data

WORKDIR /app
COPY ankisync.py ankisync.ini ./

# The image's settings live in its ini, not in SYNC_* variables, so that an ini mounted
# over /app/ankisync.ini decides everything; SYNC_* variables given to `docker run`
# still override it, as for the official server.
RUN sed -i 's|^data = ankisync-data$|data = /data|' ankisync.ini \
    && grep -q '^data = /data$' ankisync.ini
ENV PYTHONUNBUFFERED=1

USER ankisync
VOLUME /data
EXPOSE 27701

# `health` asks the server at the address and scheme (http or https) its ini and
# variables give.
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
    CMD ["python", "ankisync.py", "health"]

ENTRYPOINT ["python", "ankisync.py"]
CMD ["serve"]
