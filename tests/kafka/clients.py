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


def consume_records(bootstrap, topic):
    """Every record as `[partition, offset, value]`."""
    print(json.dumps([[m["partition"], m["offset"], m["value"]] for m in read_all(bootstrap, topic)]))


def produce_idempotent(bootstrap, topic, count, extra=None):
    """An idempotent producer (InitProducerId, sequence numbers) writes values 0..count keyed
    by value, with `extra` settings (JSON) on top; prints how many were delivered."""
    conf = {"bootstrap.servers": bootstrap, "enable.idempotence": True, "acks": "all",
            "linger.ms": 5, "partitioner": "murmur2_random"}
    conf.update(json.loads(extra or "{}"))
    p = Producer(conf)
    errors = []
    for i in range(count):
        p.produce(topic, key=str(i), value=str(i),
                  on_delivery=lambda err, msg: err and errors.append(str(err)))
        p.poll(0)
    if p.flush(60) != 0 or errors:
        raise SystemExit(f"not delivered: {errors[:3]}")
    print(json.dumps({"delivered": count}))


def group_member(bootstrap, topic, group, commit_every, max_records, instance=None):
    """One member of a consumer group: prints `partition offset value` per record, commits
    synchronously every `commit_every` records, when idle and when partitions are revoked;
    stops after `max_records` (0: never) or on SIGTERM, leaving the group cleanly."""
    import signal
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    conf = {"bootstrap.servers": bootstrap, "group.id": group, "enable.auto.commit": False,
            "auto.offset.reset": "earliest", "session.timeout.ms": 6000,
            "heartbeat.interval.ms": 500, "partition.assignment.strategy": "range"}
    if instance:
        conf["group.instance.id"] = instance
    c = Consumer(conf)
    pending = [0]

    def commit():
        if pending[0]:
            try:
                c.commit(asynchronous=False)
            except KafkaException as e:
                print(f"# commit failed: {e}", file=sys.stderr, flush=True)
            pending[0] = 0

    c.subscribe([topic], on_revoke=lambda consumer, parts: commit(),
                on_assign=lambda consumer, parts: print(
                    "# assigned " + ",".join(str(p.partition) for p in parts), flush=True))
    seen = 0
    while not stop and (max_records == 0 or seen < max_records):
        m = c.poll(0.2)
        if m is None:
            commit()
            continue
        if m.error():
            print(f"# error: {m.error()}", file=sys.stderr, flush=True)
            continue
        print(f"{m.partition()} {m.offset()} {m.value().decode()}", flush=True)
        seen += 1
        pending[0] += 1
        if pending[0] >= commit_every:
            commit()
    commit()
    c.close()


def coordinator(bootstrap, group):
    """The node id coordinating `group`, as the AdminClient finds it."""
    from confluent_kafka import ConsumerGroupState  # noqa: F401  (the wheel has it)
    a = AdminClient({"bootstrap.servers": bootstrap})
    for _, f in a.describe_consumer_groups([group]).items():
        d = f.result()
        print(json.dumps({"coordinator": d.coordinator.id, "state": str(d.state),
                          "members": len(d.members)}))


def group_admin(bootstrap, group):
    """Lists, describes and reads the offsets of `group` through the AdminClient, then
    deletes it (it must be empty)."""
    from confluent_kafka import ConsumerGroupTopicPartitions
    a = AdminClient({"bootstrap.servers": bootstrap})
    out = {}
    listed = a.list_consumer_groups(request_timeout=10).result()
    out["listed"] = sorted(g.group_id for g in listed.valid)
    for _, f in a.describe_consumer_groups([group]).items():
        out["state"] = str(f.result().state)
    for _, f in a.list_consumer_group_offsets([ConsumerGroupTopicPartitions(group)]).items():
        out["offsets"] = sorted([tp.topic, tp.partition, tp.offset]
                                for tp in f.result().topic_partitions)
    for _, f in a.delete_consumer_groups([group]).items():
        f.result()
    listed = a.list_consumer_groups(request_timeout=10).result()
    out["listed_after_delete"] = sorted(g.group_id for g in listed.valid)
    print(json.dumps(out))


def parse_offsets(topic, spec):
    """`p:o,p:o` as TopicPartitions of `topic`."""
    return [TopicPartition(topic, int(p), int(o))
            for p, o in (x.split(":") for x in spec.split(","))]


def alter_offsets(bootstrap, group, topic, spec):
    """Sets `group`'s committed offsets through the AdminClient, then lists them back."""
    from confluent_kafka import ConsumerGroupTopicPartitions
    a = AdminClient({"bootstrap.servers": bootstrap})
    out = {}
    for _, f in a.alter_consumer_group_offsets(
            [ConsumerGroupTopicPartitions(group, parse_offsets(topic, spec))]).items():
        out["altered"] = sorted([tp.partition, tp.offset] for tp in f.result().topic_partitions)
    for _, f in a.list_consumer_group_offsets([ConsumerGroupTopicPartitions(group)]).items():
        out["listed"] = sorted([tp.partition, tp.offset] for tp in f.result().topic_partitions)
    print(json.dumps(out))


def delete_records(bootstrap, topic, spec):
    """Deletes the records of `topic` before each given offset (-1: the high watermark);
    prints each partition's new low watermark, or the error's name, and then the low and
    high watermarks a consumer sees."""
    a = AdminClient({"bootstrap.servers": bootstrap})
    out = {"deleted": {}, "watermarks": {}}
    for tp, f in a.delete_records(parse_offsets(topic, spec), request_timeout=30).items():
        try:
            out["deleted"][str(tp.partition)] = f.result().low_watermark
        except KafkaException as e:
            out["deleted"][str(tp.partition)] = e.args[0].name()
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": "watermarks"})
    for tp in parse_offsets(topic, spec):
        # A just-created topic's partition may have no leader in the client's metadata
        # yet ("Unknown partition"): ask again, as an application would.
        deadline = time.time() + 20
        while True:
            try:
                low, high = c.get_watermark_offsets(TopicPartition(topic, tp.partition),
                                                    timeout=10)
                break
            except KafkaException:
                if time.time() > deadline:
                    raise
                time.sleep(0.2)
        out["watermarks"][str(tp.partition)] = [low, high]
    c.close()
    print(json.dumps(out))


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
    elif cmd == "consume-records":
        consume_records(bootstrap, rest[0])
    elif cmd == "produce-idempotent":
        produce_idempotent(bootstrap, rest[0], int(rest[1]), rest[2] if len(rest) > 2 else None)
    elif cmd == "group-member":
        group_member(bootstrap, rest[0], rest[1], int(rest[2]), int(rest[3]),
                     rest[4] if len(rest) > 4 else None)
    elif cmd == "coordinator":
        coordinator(bootstrap, rest[0])
    elif cmd == "group-admin":
        group_admin(bootstrap, rest[0])
    elif cmd == "alter-offsets":
        alter_offsets(bootstrap, rest[0], rest[1], rest[2])
    elif cmd == "delete-records":
        delete_records(bootstrap, rest[0], rest[1])
    else:
        raise SystemExit(f"unknown command {cmd}")
