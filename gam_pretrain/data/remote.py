"""Files of a shard set at a URL, by WebDataset's conventions: `https://host/folder` or `http://...`
(read with curl, as `webdataset.gopen` does) and `pipe:COMMAND` where COMMAND writes the file named
`{file}` to stdout (e.g. `pipe:aws s3 cp s3://bucket/folder/{file} -`).

`webdataset.gopen` opens the stream; what it lacks is added here: a whole file read again on a
dropped connection or a failed command, with exponential backoff, and a permanent failure reported
in one line naming the file. A file name is put into a URL or a command only when it is a plain
name (the manifest's shard names are checked as such): nothing from a file reaches a shell.
"""
from __future__ import annotations

import re
import shlex
import time

SCHEMES = ("http://", "https://", "pipe:")
PLAIN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
CURL_NOT_FOUND = 22  # curl -f: the server answered with an HTTP error (404, 403, ...)


class RemoteReadError(OSError):
    """A file of a remote shard set could not be read after every attempt."""


def is_remote(location: str) -> bool:
    return str(location).startswith(SCHEMES)


def file_url(location: str, name: str) -> str:
    if not PLAIN_NAME.fullmatch(name):
        raise RemoteReadError(f"{name!r} is not a plain file name; refusing to put it in a URL or command")
    if location.startswith("pipe:"):
        if "{file}" not in location:
            raise RemoteReadError(f"{location}: a pipe: location needs {{file}} where each file's name goes")
        return location.replace("{file}", name)
    return location.rstrip("/") + "/" + name


def read_remote(location: str, name: str, attempts: int = 5, first_wait_s: float = 0.5) -> bytes:
    """The whole file `name` of the shard set at `location`, read again (up to `attempts` times, the
    waits doubling) when the connection drops or the command fails; an HTTP error status is final."""
    try:
        from webdataset.gopen import gopen
    except ImportError:
        raise RemoteReadError(f"reading {location} needs the webdataset package: pip install webdataset") from None

    url = file_url(location, name)
    # http(s) through curl as webdataset.gopen does, plus a stall limit: a server that stops sending
    # without closing the connection (under 1 KB/s for 60 s) counts as a dropped connection
    opened = url if location.startswith("pipe:") else (
        "pipe:curl --connect-timeout 30 --speed-limit 1024 --speed-time 60 -f -s -L " + shlex.quote(url))
    last = ""
    for attempt in range(attempts):
        if attempt:
            time.sleep(first_wait_s * 2 ** (attempt - 1))
        try:
            with gopen(opened, "rb") as stream:
                return stream.read()
        except Exception as e:  # gopen's Pipe raises a bare Exception/IOError naming the exit status
            last = str(e).splitlines()[0] if str(e) else type(e).__name__
            if f"exit {CURL_NOT_FOUND} " in last + " " and not location.startswith("pipe:"):
                raise RemoteReadError(f"{url}: the server refused it (HTTP error; curl exit {CURL_NOT_FOUND})") from None
    raise RemoteReadError(f"{url} could not be read in {attempts} attempts (last: {last[:200]})")
