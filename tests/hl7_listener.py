"""A stand-in EHR interface engine: an MLLP listener built on python-hl7, run as its own process.

``python -m tests.hl7_listener --port P --out FILE [--reject PATIENT=REASON ...] [--error PATIENT=REASON ...]
[--ack-delay-ms N]``

Each message received is appended to FILE as one JSON line (``control_id``, ``type``,
``patient``, ``raw``) and flushed BEFORE the ACK is written, so a listener killed between
the two has recorded a message its sender will send again. The ACK is AA, or AR (``--reject``)
or AE (``--error``) with the reason in ERR-8 for messages of the given patient (PID-3.1).
Prints ``listening <port>`` once it accepts connections.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys

import hl7
from hl7.mllp import start_hl7_server


def _answers(pairs: list[str]) -> dict[str, str]:
    return dict(p.split("=", 1) for p in pairs)


async def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--reject", action="append", default=[])
    ap.add_argument("--error", action="append", default=[])
    ap.add_argument("--ack-delay-ms", type=float, default=0.0)
    args = ap.parse_args(argv)
    reject, error = _answers(args.reject), _answers(args.error)
    out = open(args.out, "a", encoding="utf-8")

    async def client(reader, writer) -> None:
        try:
            while True:
                msg = await reader.readmessage()
                patient = str(msg["PID.3.1"]) if any(str(s[0]) == "PID" for s in msg) else ""
                out.write(json.dumps({"control_id": str(msg["MSH.10"]), "type": str(msg.segment("MSH")(9)),
                                      "patient": patient, "raw": str(msg)}) + "\n")
                out.flush()
                if args.ack_delay_ms:
                    await asyncio.sleep(args.ack_delay_ms / 1000)
                code, reason = "AA", ""
                if patient in reject:
                    code, reason = "AR", reject[patient]
                elif patient in error:
                    code, reason = "AE", error[patient]
                ack = msg.create_ack(code, message_id=f"ACK{msg['MSH.10']}")
                if reason:
                    err = ack.create_segment([ack.create_field(["ERR"])])
                    err.assign_field(reason, 8)
                    ack.append(err)
                writer.writemessage(ack)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await start_hl7_server(client, "127.0.0.1", args.port, encoding="ascii")
    print(f"listening {args.port}", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    try:
        asyncio.run(main(sys.argv[1:]))
    except KeyboardInterrupt:
        pass
