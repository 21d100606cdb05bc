# ankisync in a container: the standard library of Python 3.14 includes zstd,
# so the image needs nothing beyond the one file.
#
#   docker build -t ankisync .
#   docker run -d --name ankisync -p 27701:27701 -v ankisync-data:/data \
#       -e SYNC_USER1=alice:secret ankisync
#   docker exec -i ankisync python ankisync.py adduser bob   # password on stdin
FROM python:3.14-slim

RUN useradd --system --uid 10001 --home-dir /app --shell /usr/sbin/nologin ankisync \
    && mkdir -p /data \
    && chown ankisync /data

WORKDIR /app
COPY ankisync.py ankisync.ini ./

# Settings come from ankisync.ini, overridden by the official server's variables.
ENV SYNC_BASE=/data \
    SYNC_HOST=0.0.0.0 \
    SYNC_PORT=27701 \
    PYTHONUNBUFFERED=1

USER ankisync
VOLUME /data
EXPOSE 27701

HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import os, sys, urllib.request; url = 'http://127.0.0.1:%s/health' % os.environ.get('SYNC_PORT', '27701'); sys.exit(urllib.request.urlopen(url, timeout=4).status != 200)"]

ENTRYPOINT ["python", "ankisync.py"]
CMD ["serve"]
