"""Records the request frames real Kafka clients send, as the seed corpus of the
`kafka_request` fuzz target.

Run a node whose Kafka listener advertises this proxy's host, so that clients come back
through it after bootstrapping:

    aqueduct serve --listen-host 127.0.0.9 --kafka-advertised-host 127.0.0.10 &
    python3 fuzz/capture.py 127.0.0.10 127.0.0.9 fuzz/corpus/kafka_request &
    kcat -b 127.0.0.10:9092 -L   # ... and any other client

Each frame (length prefix included) is written to `<api_key>-v<version>-<sha1 prefix>`.
"""
import hashlib
import os
import socket
import struct
import sys
import threading


def pump(src, dst, record_dir=None):
    buf = b""
    try:
        while True:
            data = src.recv(65536)
            if not data:
                break
            dst.sendall(data)
            if record_dir is None:
                continue
            buf += data
            while len(buf) >= 4:
                (n,) = struct.unpack(">i", buf[:4])
                if len(buf) < 4 + n:
                    break
                frame, buf = buf[: 4 + n], buf[4 + n :]
                key, version = struct.unpack(">hh", frame[4:8])
                digest = hashlib.sha1(frame).hexdigest()[:12]
                with open(os.path.join(record_dir, f"{key}-v{version}-{digest}"), "wb") as f:
                    f.write(frame)
    except OSError:
        pass
    finally:
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def main():
    listen_host, target_host, record_dir = sys.argv[1:4]
    os.makedirs(record_dir, exist_ok=True)
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind((listen_host, 9092))
    server.listen()
    while True:
        client, _ = server.accept()
        upstream = socket.create_connection((target_host, 9092))
        threading.Thread(target=pump, args=(client, upstream, record_dir), daemon=True).start()
        threading.Thread(target=pump, args=(upstream, client), daemon=True).start()


if __name__ == "__main__":
    main()
