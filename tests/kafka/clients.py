"""confluent-kafka-python (PyPI wheel, bundled librdkafka) against Aqueduct's Kafka port.

Run by tests/kafka_clients.rs; each subcommand prints one JSON document (or one line per
acknowledged record) on stdout and exits non-zero on any failure.
"""
import json
import sys
import time

from confluent_kafka import Consumer, KafkaException, Producer, TopicPartition
from confluent_kafka.admin import (AdminClient, AlterConfigOpType, ConfigEntry, ConfigResource,
                                  NewPartitions, NewTopic)


def admin(bootstrap):
    """Creates, describes, alters, grows and deletes a topic through the AdminClient."""
    a = AdminClient({"bootstrap.servers": bootstrap})
    out = {}
    # Every node reports the same cluster id (each asked on its own).
    out["cluster_ids"] = sorted({
        AdminClient({"bootstrap.servers": server}).list_topics(timeout=10).cluster_id
        for server in bootstrap.split(",")
    }, key=str)
    topic = "py-admin"
    for _, f in a.create_topics(
        [NewTopic(topic, num_partitions=2, replication_factor=3, config={"retention.ms": "3600000"})]
    ).items():
        f.result()
    try:
        for _, f in a.create_topics([NewTopic(topic, num_partitions=1, replication_factor=1)]).items():
            f.result()
        out["duplicate_create"] = "accepted"
    except KafkaException as e:
        out["duplicate_create"] = e.args[0].name()
    res = ConfigResource("topic", topic)
    for _, f in a.describe_configs([res]).items():
        out["retention_before"] = f.result()["retention.ms"].value
    for _, f in a.incremental_alter_configs(
        [ConfigResource("topic", topic, incremental_configs=[
            ConfigEntry("retention.ms", "7200000", incremental_operation=AlterConfigOpType.SET)
        ])]
    ).items():
        f.result()
    for _, f in a.describe_configs([res]).items():
        out["retention_after"] = f.result()["retention.ms"].value
    try:
        for _, f in a.alter_configs([ConfigResource("topic", topic, set_config={"retention.ms": "nonsense"})]).items():
            f.result()
        out["bad_config"] = "accepted"
    except KafkaException as e:
        out["bad_config"] = e.args[0].name()
    for _, f in a.create_partitions([NewPartitions(topic, 4)]).items():
        f.result()
    deadline = time.time() + 10
    while time.time() < deadline:
        out["partitions"] = len(a.list_topics(timeout=5).topics[topic].partitions)
        if out["partitions"] == 4:
            break
        time.sleep(0.2)
    for _, f in a.delete_topics([topic]).items():
        f.result()
    deadline = time.time() + 10
    while time.time() < deadline:
        out["listed_after_delete"] = topic in a.list_topics(timeout=5).topics
        if not out["listed_after_delete"]:
            break
        time.sleep(0.2)
    print(json.dumps(out))


def codecs(bootstrap, topic):
    """Produces 200 keyed records with headers per codec and reads them all back."""
    sent = {}
    for codec in ["none", "gzip", "snappy", "lz4", "zstd"]:
        p = Producer({"bootstrap.servers": bootstrap, "compression.type": codec, "acks": "all",
                      "partitioner": "murmur2_random", "linger.ms": 20})
        errors = []
        for i in range(200):
            key, value = f"{codec}-k{i % 7}", f"{codec}-{i}-" + "x" * (i % 50)
            sent[value] = key
            p.produce(topic, key=key, value=value, headers=[("codec", codec.encode())],
                      on_delivery=lambda err, msg: err and errors.append(str(err)))
        if p.flush(30) != 0 or errors:
            raise SystemExit(f"{codec}: not delivered: {errors[:3]}")
    got = read_all(bootstrap, topic)
    bad = [m for m in got if sent.get(m["value"]) != m["key"] or m["headers"].get("codec") != m["value"].split("-")[0]]
    print(json.dumps({"sent": len(sent), "read": len(got), "distinct": len({m["value"] for m in got}), "bad": bad[:3]}))


def read_all(bootstrap, topic, timeout=60):
    """Every record of every partition of `topic`, up to the high watermarks read first."""
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": "py-reader", "enable.auto.commit": False})
    md = c.list_topics(topic, timeout=10).topics[topic]
    ends = {}
    for p in md.partitions:
        _, high = c.get_watermark_offsets(TopicPartition(topic, p), timeout=10)
        if high > 0:
            ends[p] = high
    c.assign([TopicPartition(topic, p, 0) for p in ends])
    out, deadline = [], time.time() + timeout
    while ends and time.time() < deadline:
        m = c.poll(0.5)
        if m is None:
            continue
        if m.error():
            raise SystemExit(f"consume: {m.error()}")
        out.append({"key": m.key().decode() if m.key() else None, "value": m.value().decode(),
                    "headers": {k: v.decode() for k, v in (m.headers() or [])},
                    "partition": m.partition(), "offset": m.offset()})
        if m.offset() + 1 >= ends.get(m.partition(), 0):
            ends.pop(m.partition(), None)
    c.close()
    if ends:
        raise SystemExit(f"partitions not read to their end in {timeout} s: {ends}")
    return out


def produce_acked(bootstrap, topic, count, rate):
    """acks=all producer of values 0..count at about `rate` per second; prints each
    acknowledged value on its own line as its delivery report arrives."""
    p = Producer({"bootstrap.servers": bootstrap, "acks": "all", "linger.ms": 5,
                  "message.timeout.ms": 60000, "retry.backoff.ms": 100})

    def report(err, msg):
        if err is None:
            print(msg.value().decode(), flush=True)

    start = time.time()
    for i in range(count):
        p.produce(topic, value=str(i), on_delivery=report)
        p.poll(0)
        ahead = start + i / rate - time.time()
        if ahead > 0:
            time.sleep(ahead)
    p.flush(90)


def consume_values(bootstrap, topic):
    print(json.dumps([m["value"] for m in read_all(bootstrap, topic)]))


if __name__ == "__main__":
    cmd, bootstrap, *rest = sys.argv[1:]
    if cmd == "admin":
        admin(bootstrap)
    elif cmd == "codecs":
        codecs(bootstrap, rest[0])
    elif cmd == "produce-acked":
        produce_acked(bootstrap, rest[0], int(rest[1]), float(rest[2]))
    elif cmd == "consume-values":
        consume_values(bootstrap, rest[0])
    else:
        raise SystemExit(f"unknown command {cmd}")
