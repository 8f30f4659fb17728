"""MQTT clients for the tests (paho-mqtt 2.x), one subcommand each, JSON lines on stdout.

  connect    connect once; {"rc": CONNACK reason code (3.1.1 codes as paho maps them)}
  publish    connect, publish --count messages (`{i}` in the payload is the index) at --qos,
             one line per acknowledgement {"i", "rc"}, then {"done": n}; exit 3 on --timeout
  subscribe  connect, subscribe, {"suback": [codes]}, then one line per message until
             --count messages or --seconds; {"disconnected": rc} when the server drops it;
             without --topic it subscribes to nothing and prints {"connected", "session_present"}
  respond    a device answering its requests for --seconds: subscribes to its commands,
             properties/set and properties/get topics, prints {"request": topic, "payload"}
             for each and answers it on the matching response topic (commands: the paras
             echoed; set: result_code 0; get: {"temperature": 21.5}); --mute: no answers

Device credentials: --device ID --secret S gives the plain mode; with --sign-type 0|1 the
signed mode (client id ID_0_T_YYYYMMDDHH, password = HMAC-SHA256 keyed by the timestamp).
"""

import argparse
import datetime
import hashlib
import hmac
import json
import os
import sys
import threading
import time

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.properties import Properties
from paho.mqtt.packettypes import PacketTypes


def out(obj):
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def credentials(a):
    """(client id, username, password) from the arguments."""
    if a.device is None:
        return a.client_id or "", a.username, a.password
    if a.sign_type is None:
        return a.client_id or a.device, a.username or a.device, a.password or a.secret
    ts = a.timestamp or datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d%H")
    password = hmac.new(ts.encode(), a.secret.encode(), hashlib.sha256).hexdigest()
    if a.password is not None:
        password = a.password
    return f"{a.device}_0_{a.sign_type}_{ts}", a.username or a.device, password


def client(a):
    client_id, username, password = credentials(a)
    proto = mqtt.MQTTv5 if a.v5 else mqtt.MQTTv311
    kwargs = {"callback_api_version": CallbackAPIVersion.VERSION2, "client_id": client_id,
              "protocol": proto}
    if not a.v5:
        kwargs["clean_session"] = not a.persistent
    c = mqtt.Client(**kwargs)
    if username is not None:
        c.username_pw_set(username, password)
    if a.will_topic:
        c.will_set(a.will_topic, a.will_payload, qos=1, retain=a.will_retain)
    state = {"rc": None, "event": threading.Event(), "disconnected": None}

    def on_connect(_c, _u, flags, rc, _p):
        state["rc"] = rc.value
        state["session_present"] = bool(flags.session_present)
        state["event"].set()

    def on_disconnect(_c, _u, _flags, rc, _p):
        state["disconnected"] = rc.value
        if state["rc"] is None:
            state["rc"] = rc.value
        state["event"].set()

    c.on_connect = on_connect
    c.on_disconnect = on_disconnect
    return c, state


def connect(a):
    c, state = client(a)
    props = None
    if a.v5:
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 3600 if a.persistent else 0
    try:
        c.connect(a.host, a.port, keepalive=a.keepalive, clean_start=not a.persistent
                  if a.v5 else mqtt.MQTT_CLEAN_START_FIRST_ONLY, properties=props)
    except OSError as e:
        out({"rc": None, "error": str(e)})
        sys.exit(2)
    c.loop_start()
    if not state["event"].wait(a.connect_timeout):
        out({"rc": None, "error": "no CONNACK"})
        sys.exit(2)
    return c, state


def connected(a):
    """A connected client, or exit 2 with the CONNACK code."""
    c, state = connect(a)
    if state["rc"] != 0:
        out({"rc": state["rc"]})
        sys.exit(2)
    return c, state


def cmd_connect(a):
    c, state = connect(a)
    out({"rc": state["rc"], "session_present": state.get("session_present")})
    if state["rc"] == 0:
        c.disconnect()
    c.loop_stop()


def cmd_publish(a):
    c, state = connected(a)
    out({"connected": True})
    acks = {}
    lock = threading.Condition()

    def on_publish(_c, _u, mid, rc, _p):
        with lock:
            acks[mid] = rc.value
            lock.notify_all()

    c.on_publish = on_publish
    time.sleep(a.delay)
    deadline = time.time() + a.timeout
    mids = []
    for i in range(a.count):
        payload = a.payload.replace("{i}", str(i))
        info = c.publish(a.topic, payload, qos=a.qos, retain=a.retain)
        mids.append(info.mid)
        # Keep at most --window unacknowledged.
        with lock:
            while sum(1 for m in mids if m not in acks) >= a.window:
                if state["disconnected"] is not None or time.time() > deadline:
                    break
                lock.wait(0.05)
        if state["disconnected"] is not None or time.time() > deadline:
            break
    reported = set()
    while True:
        with lock:
            for i, m in enumerate(mids):
                if m in acks and i not in reported:
                    reported.add(i)
                    out({"i": i, "rc": acks[m]})
            if len(reported) == a.count or a.qos == 0:
                break
            if state["disconnected"] is not None or time.time() > deadline:
                out({"timeout": state["disconnected"] is None, "unacked": a.count - len(reported),
                     "disconnected": state["disconnected"]})
                # Not loop_stop(): paho's loop never ends while a QoS 1 message is unacked.
                os._exit(3)
            lock.wait(0.05)
    out({"done": len(reported)})
    if a.hold:
        time.sleep(a.hold)
    if a.kill:
        # Drop the socket without DISCONNECT (as a crashed client): the will fires.
        c._sock.close()
        time.sleep(0.5)
        sys.exit(0)
    c.disconnect()
    c.loop_stop()


def cmd_subscribe(a):
    c, state = connected(a)
    got = []
    done = threading.Event()
    subacked = threading.Event()

    def on_subscribe(_c, _u, _mid, codes, _p):
        out({"suback": [r.value for r in codes]})
        subacked.set()

    def on_message(_c, _u, m):
        got.append(1)
        out({"topic": m.topic, "payload": m.payload.decode(errors="replace"),
             "retain": bool(m.retain), "qos": m.qos})
        if a.count and len(got) >= a.count:
            done.set()

    c.on_subscribe = on_subscribe
    c.on_message = on_message
    if a.topic:
        c.subscribe([(t, a.qos) for t in a.topic])
        subacked.wait(a.connect_timeout)
    else:
        # No topic: a resumed session's own subscriptions deliver.
        out({"connected": True, "session_present": state.get("session_present")})
    end = time.time() + a.seconds
    while time.time() < end and not done.is_set():
        if state["disconnected"] is not None:
            out({"disconnected": state["disconnected"]})
            break
        time.sleep(0.02)
    c.disconnect()
    c.loop_stop()


def cmd_respond(a):
    c, state = connected(a)
    base = f"$oc/devices/{a.device}/sys/"
    subacked = threading.Event()

    def on_subscribe(_c, _u, _mid, codes, _p):
        out({"suback": [r.value for r in codes]})
        subacked.set()

    def on_message(cl, _u, m):
        payload = json.loads(m.payload.decode())
        out({"request": m.topic, "payload": payload})
        if a.mute:
            return
        what, _, request_id = m.topic[len(base):].rpartition("/request_id=")
        if what == "commands":
            answer = {"result_code": 0, "response_name": payload.get("command_name"),
                      "paras": {"echo": payload.get("paras")}}
        elif what == "properties/set":
            answer = {"result_code": 0, "result_desc": "set"}
        else:
            answer = {"services": [{"service_id": payload.get("service_id"),
                                    "properties": {"temperature": 21.5}}]}
        cl.publish(f"{base}{what}/response/request_id={request_id}", json.dumps(answer), qos=1)

    c.on_subscribe = on_subscribe
    c.on_message = on_message
    c.subscribe([(base + t, 1) for t in ("commands/#", "properties/set/#", "properties/get/#")])
    subacked.wait(a.connect_timeout)
    end = time.time() + a.seconds
    while time.time() < end and state["disconnected"] is None:
        time.sleep(0.02)
    c.disconnect()
    c.loop_stop()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("cmd", choices=["connect", "publish", "subscribe", "respond"])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=1883)
    p.add_argument("--v5", action="store_true")
    p.add_argument("--client-id")
    p.add_argument("--username")
    p.add_argument("--password")
    p.add_argument("--device")
    p.add_argument("--secret")
    p.add_argument("--sign-type", type=int, choices=[0, 1])
    p.add_argument("--timestamp")
    p.add_argument("--keepalive", type=int, default=30)
    p.add_argument("--persistent", action="store_true")
    p.add_argument("--connect-timeout", type=float, default=10)
    p.add_argument("--topic", action="append", default=[])
    p.add_argument("--payload", default="")
    p.add_argument("--qos", type=int, default=1)
    p.add_argument("--retain", action="store_true")
    p.add_argument("--count", type=int, default=1)
    p.add_argument("--window", type=int, default=1)
    p.add_argument("--timeout", type=float, default=30)
    p.add_argument("--seconds", type=float, default=5)
    p.add_argument("--hold", type=float, default=0)
    p.add_argument("--delay", type=float, default=0)
    p.add_argument("--kill", action="store_true")
    p.add_argument("--will-topic")
    p.add_argument("--will-payload", default="")
    p.add_argument("--will-retain", action="store_true")
    p.add_argument("--mute", action="store_true")
    a = p.parse_args()
    if a.cmd == "publish":
        a.topic = a.topic[0]
    {"connect": cmd_connect, "publish": cmd_publish, "subscribe": cmd_subscribe,
     "respond": cmd_respond}[a.cmd](a)


if __name__ == "__main__":
    main()
