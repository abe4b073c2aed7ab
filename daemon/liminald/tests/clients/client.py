"""A Python D-Bus client of liminald (jeepney): starts a run, follows it.

usage: client.py BUS_ADDRESS PLAN_PATH [bad]
Prints the run's JSON (GetRun) on stdout; with "bad", expects InvalidPlan
and prints the error name and message.
"""
import json
import sys
import time

from jeepney import DBusAddress, new_method_call
from jeepney.io.blocking import open_dbus_connection

NAME = "org.liminalqa.Liminal1"
mgr = DBusAddress("/org/liminalqa/Liminal1", bus_name=NAME,
                  interface="org.liminalqa.Liminal1.Manager")


def call(conn, method, sig="", args=()):
    reply = conn.send_and_get_reply(new_method_call(mgr, method, sig, args), timeout=30)
    if reply.header.message_type.name == "error":
        name = reply.header.fields.get(4)  # HeaderFields.error_name
        raise RuntimeError(f"{name}: {reply.body[0] if reply.body else ''}")
    return reply.body


def main():
    address, plan_path = sys.argv[1], sys.argv[2]
    bad = len(sys.argv) > 3
    conn = open_dbus_connection(bus=address)
    with open(plan_path) as f:
        text = f.read()
    try:
        run_id, path = call(conn, "StartRun", "sa{sh}a{sv}",
                            (text, {}, {"plan_path": ("s", plan_path)}))
    except RuntimeError as e:
        if bad:
            print(e)
            return 0
        raise
    if bad:
        print("expected InvalidPlan, got a run", run_id)
        return 1
    deadline = time.time() + 120
    while time.time() < deadline:
        (text,) = call(conn, "GetRun", "s", (run_id,))
        run = json.loads(text)
        if run["status"] not in ("queued", "running"):
            print(json.dumps(run))
            return 0
        time.sleep(0.05)
    print("run did not finish", run_id)
    return 1


sys.exit(main())
