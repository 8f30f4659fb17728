"""MQTT 5 features and persistent sessions through Aqueduct's general broker (paho-mqtt 2.x).

Usage: features.py HOST PORT. Prints one JSON object: what each check saw.
"""

import json
import sys
import time

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

HOST, PORT = sys.argv[1], int(sys.argv[2])
got = []


def client(cid, v5=True, clean=True, expiry=None, alias_max=None):
    kwargs = {"callback_api_version": CallbackAPIVersion.VERSION2, "client_id": cid,
              "protocol": mqtt.MQTTv5 if v5 else mqtt.MQTTv311}
    if not v5:
        kwargs["clean_session"] = clean
    c = mqtt.Client(**kwargs)
    c.user_data_set({"present": None})

    def on_message(_c, _u, m):
        props = {}
        p = getattr(m, "properties", None)
        if p is not None:
            for name in ("UserProperty", "ResponseTopic", "CorrelationData",
                         "MessageExpiryInterval"):
                if hasattr(p, name):
                    v = getattr(p, name)
                    props[name] = v.decode() if isinstance(v, bytes) else v
        got.append({"client": cid, "topic": m.topic, "payload": m.payload.decode(),
                    "retain": bool(m.retain), "props": props})

    def on_connect(_c, u, flags, _rc, _p):
        u["present"] = bool(flags.session_present)

    c.on_message = on_message
    c.on_connect = on_connect
    if v5:
        p = Properties(PacketTypes.CONNECT)
        if expiry is not None:
            p.SessionExpiryInterval = expiry
        if alias_max is not None:
            p.TopicAliasMaximum = alias_max
        c.connect(HOST, PORT, clean_start=clean, properties=p)
    else:
        c.connect(HOST, PORT)
    c.loop_start()
    deadline = time.time() + 10
    while c._userdata["present"] is None and time.time() < deadline:
        time.sleep(0.02)
    return c


def settle(t=0.5):
    time.sleep(t)


out = {}
sub = client("f-sub")
sub.subscribe("f/#", qos=1)
# A subscriber that takes topic aliases from the server, on a wildcard filter.
aliased = client("f-aliased", alias_max=10)
aliased.subscribe("f/#", qos=1)
settle()
pub = client("f-pub")
props = Properties(PacketTypes.PUBLISH)
props.UserProperty = [("k", "v")]
props.ResponseTopic = "f-reply/1"
props.CorrelationData = b"abc"
props.MessageExpiryInterval = 60
pub.publish("f/props", "p", qos=1, properties=props).wait_for_publish(5)
alias = Properties(PacketTypes.PUBLISH)
alias.TopicAlias = 3
pub.publish("f/alias", "a1", qos=1, properties=alias).wait_for_publish(5)
pub.publish("", "a2", qos=1, properties=alias).wait_for_publish(5)
settle()
out["messages"] = [g for g in got if g["client"] == "f-sub"]
out["aliased_topics"] = [g["topic"] for g in got if g["client"] == "f-aliased"]

# A retained message that expires after 1 s is not given to a later subscriber.
expiring = Properties(PacketTypes.PUBLISH)
expiring.MessageExpiryInterval = 1
pub.publish("g/expiring", "gone", qos=1, retain=True, properties=expiring).wait_for_publish(5)
pub.publish("g/kept", "kept", qos=1, retain=True).wait_for_publish(5)
settle(2.5)
got.clear()
late = client("f-late")
late.subscribe("g/#", qos=1)
settle(1)
out["retained_after_expiry"] = sorted(g["payload"] for g in got)


def away(cid, first, second, wait=0.5, disconnect_expiry=None):
    """Subscribes with `first`, goes away, a QoS 1 message is published, comes back with
    `second`: whether the session was there and what it delivered."""
    topic = f"h/{cid}"
    c = client(cid, **first)
    c.subscribe(topic, qos=1)
    settle()
    if disconnect_expiry is None:
        c.disconnect()
    else:
        p = Properties(PacketTypes.DISCONNECT)
        p.SessionExpiryInterval = disconnect_expiry
        c.disconnect(properties=p)
    c.loop_stop()
    settle(wait)
    pub.publish(topic, f"away-{cid}", qos=1).wait_for_publish(5)
    settle()
    got.clear()
    c = client(cid, **second)
    settle(1.5)
    seen = {"session_present": c._userdata["present"],
            "payloads": [g["payload"] for g in got if g["client"] == cid]}
    c.disconnect()
    c.loop_stop()
    settle(0.2)
    return seen


# Persistent sessions: QoS 1 messages published while the subscriber is away are delivered
# when it comes back (3.1.1 clean_session=0; 5 clean_start=0 with a session expiry), and
# MQTT 5 session lifetimes follow the expiry interval, not clean start alone.
kept = {"clean": False, "expiry": 300}
out["persistent_v311"] = away("f-persist-v311", {"v5": False, "clean": False},
                              {"v5": False, "clean": False})
out["persistent_v5"] = away("f-persist-v5", kept, kept)
out["clean_start_with_expiry"] = away("f-cs", {"clean": True, "expiry": 300}, kept)
out["no_expiry"] = away("f-ne", {"clean": False}, kept)
out["expired"] = away("f-ex", {"clean": False, "expiry": 1}, kept, wait=2.5)
out["disconnect_expiry_zero"] = away("f-dz", kept, kept, disconnect_expiry=0)
out["clean_start_ends_it"] = away("f-ce", kept, {"clean": True, "expiry": 300})

# A second connection with the same client id takes the session over: the first is told.
reasons = []
first = client("f-takeover")
first.on_disconnect = lambda _c, _u, _f, rc, _p: reasons.append(rc.value)
second = client("f-takeover")
settle(1)
out["taken_over"] = reasons
second.disconnect()
print(json.dumps(out))
