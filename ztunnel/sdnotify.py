"""systemd service notifications (sd_notify): READY=1, STATUS=, STOPPING=1, WATCHDOG=1."""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping

NOTIFY_SOCKET = "NOTIFY_SOCKET"


class NotifyError(Exception):
    """NOTIFY_SOCKET is set but the message could not be delivered."""


def socket_address(env: Mapping[str, str] | None = None) -> str | bytes | None:
    """The address to send notifications to, or None when not started by systemd.

    `@name` is a Linux abstract socket (returned as bytes with a leading NUL); an
    absolute path is a filesystem socket. Anything else is ignored, as systemd does.
    """
    value = (os.environ if env is None else env).get(NOTIFY_SOCKET, "")
    if value.startswith("@") and len(value) > 1:
        return b"\0" + value[1:].encode()
    if value.startswith("/"):
        return value
    return None


def format_message(**fields: str | int) -> bytes:
    """`ready=1, status="x"` -> b"READY=1\\nSTATUS=x" (keys upper-cased, one per line)."""
    lines = []
    for key, value in fields.items():
        text = str(value)
        if "\n" in text:
            raise ValueError(f"sd_notify field {key.upper()} must be one line, got {text!r}")
        lines.append(f"{key.upper()}={text}")
    return "\n".join(lines).encode()


def notify(message: bytes, env: Mapping[str, str] | None = None) -> bool:
    """Send one datagram to NOTIFY_SOCKET; False when not running under systemd.

    Raises NotifyError when the socket is configured but unreachable (systemd then
    never sees readiness and stops the unit after TimeoutStartSec).
    """
    addr = socket_address(env)
    if addr is None:
        return False
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
        try:
            s.sendto(message, addr)
        except OSError as e:
            shown = addr.decode(errors="replace").replace("\0", "@") if isinstance(
                addr, bytes) else addr
            raise NotifyError(f"cannot notify systemd at {shown}: {e.strerror or e}: is "
                              "the unit's NotifyAccess= set to main or all?") from None
    return True


def ready(status: str = "", env: Mapping[str, str] | None = None) -> bool:
    """Tell systemd the service is ready (call once listeners accept and config is loaded)."""
    fields: dict[str, str | int] = {"ready": 1, "mainpid": os.getpid()}
    if status:
        fields["status"] = status
    return notify(format_message(**fields), env)


def status(text: str, env: Mapping[str, str] | None = None) -> bool:
    """Update the one-line status shown by `systemctl status`."""
    return notify(format_message(status=text), env)


def stopping(status: str = "", env: Mapping[str, str] | None = None) -> bool:
    """Tell systemd a graceful stop (drain) has begun."""
    fields: dict[str, str | int] = {"stopping": 1}
    if status:
        fields["status"] = status
    return notify(format_message(**fields), env)


def reloading(env: Mapping[str, str] | None = None) -> bool:
    """Tell systemd configuration is being reloaded (send ready() when done)."""
    return notify(format_message(reloading=1), env)


def watchdog(env: Mapping[str, str] | None = None) -> bool:
    """Keep-alive for WatchdogSec=; send at least every watchdog_interval() seconds."""
    return notify(format_message(watchdog=1), env)


def watchdog_interval(env: Mapping[str, str] | None = None) -> float | None:
    """Half of WatchdogSec= in seconds (how often to ping), or None when no watchdog is set.

    Honours WATCHDOG_PID: when set to another process's pid the watchdog is not ours.
    """
    e = os.environ if env is None else env
    usec = e.get("WATCHDOG_USEC", "")
    pid = e.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    if pid and (not pid.isdigit() or int(pid) != os.getpid()):
        return None
    return int(usec) / 2e6
