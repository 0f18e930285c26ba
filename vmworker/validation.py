"""Checking and normalising request parameters (pure, no side effects).

A request that fails here is answered 400 with a sentence naming the
parameter, what was wrong and what is allowed, and nothing is created.
Normalised parameters are what the journal records and what an idempotent
retry of ``start`` is compared against.
"""

from __future__ import annotations

import os
import re
import uuid as uuidlib
from typing import Iterable, Mapping
from urllib.parse import unquote, urlsplit

from .errors import BadRequest

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}\Z")
REMOTE_SCHEMES = ("http", "https", "ftp")
MAX_URI = 4096
MAX_CPUS = 255          # QEMU's limit for the pc machine
MIN_MEM_MB, MAX_MEM_MB = 16, 4 << 20
TRUE_WORDS = {"1", "true", "yes", "on"}
FALSE_WORDS = {"0", "false", "no", "off", ""}

START_REQUIRED = ("name", "cpu_count", "mem_size", "hda_image")
START_OPTIONAL = ("hda_save_to", "hdb_image", "hdb_save_to", "cd_image",
                  "run_agent", "soft_list", "uuid", "hda_image_sha256",
                  "hdb_image_sha256", "cd_image_sha256")
MODIFY_FIELDS = ("hda_save_to", "hdb_save_to", "cd_image", "cd_image_sha256")
SHA256_RE = re.compile(r"[0-9a-fA-F]{64}\Z")
SELECTORS = ("uuid", "name")


def single(params: Mapping[str, object], key: str) -> str | None:
    """The one string value of ``key``; a repeated parameter is an error."""
    value = params.get(key)
    if value is None:
        return None
    if isinstance(value, (list, tuple)):
        raise BadRequest(f"parameter {key!r} was given {len(value)} times; "
                         "give it once")
    if not isinstance(value, str):
        raise BadRequest(f"parameter {key!r} must be text")
    return value


def reject_unknown(params: Mapping[str, object], allowed: Iterable[str]) -> None:
    allowed = tuple(allowed)
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise BadRequest(
            f"unknown parameter{'s' if len(unknown) > 1 else ''} "
            f"{', '.join(repr(u) for u in unknown)}; allowed: "
            f"{', '.join(allowed) or 'none'}")


def name(value: str | None, key: str = "name") -> str:
    if value is None or value == "":
        raise BadRequest(f"parameter {key!r} is required")
    if not NAME_RE.match(value):
        raise BadRequest(
            f"{key} {value[:80]!r} is not allowed: use 1 to 64 characters "
            "from A-Z a-z 0-9 _ . -, starting with a letter or digit")
    return value


def vm_uuid(value: str, key: str = "uuid") -> str:
    try:
        parsed = uuidlib.UUID(value)
    except (ValueError, AttributeError, TypeError):
        raise BadRequest(f"{key} {value[:80]!r} is not a UUID "
                         "(like 6f1c2a9e-0b7d-4c51-9a8e-2d4f3b6a7c10)") from None
    canonical = str(parsed)
    if value.lower() != canonical:
        raise BadRequest(f"{key} {value[:80]!r} is not in canonical form; "
                         f"use {canonical}")
    return canonical


def integer(value: str | None, key: str, low: int, high: int, unit: str = "") -> int:
    if value is None or value == "":
        raise BadRequest(f"parameter {key!r} is required")
    if not re.fullmatch(r"[0-9]{1,9}", value.strip()):
        raise BadRequest(f"{key} must be a whole number from {low} to {high}"
                         f"{unit}, not {value[:40]!r}")
    number = int(value)
    if not low <= number <= high:
        raise BadRequest(f"{key} must be from {low} to {high}{unit}, "
                         f"not {number}")
    return number


def boolean(value: str | None, key: str) -> bool | None:
    if value is None:
        return None
    word = value.strip().lower()
    if word in TRUE_WORDS:
        return True
    if word in FALSE_WORDS:
        return False
    raise BadRequest(f"{key} must be true or false, not {value[:40]!r}")


def _clean_text(value: str, key: str) -> None:
    if "\x00" in value or "\n" in value or "\r" in value:
        raise BadRequest(f"{key} must not contain NUL or line breaks")

    if len(value) > MAX_URI:
        raise BadRequest(f"{key} is longer than {MAX_URI} characters")


def _split(value: str, key: str):
    try:
        return urlsplit(value)
    except ValueError as err:
        raise BadRequest(f"{key} {value[:80]!r} is not a valid URI "
                         f"({err})") from None


def sha256(value: str | None, key: str, image: str | None) -> str:
    """An optional hex sha256 that the named image must have."""
    if not value:
        return ""
    if not image:
        raise BadRequest(f"{key} is set but {key[:-len('_sha256')]} is not")
    if not SHA256_RE.match(value):
        raise BadRequest(f"{key} must be 64 hexadecimal digits, "
                         f"not {value[:80]!r}")
    return value.lower()


def local_path(uri: str, key: str) -> str | None:
    """The absolute path a local URI names, or None for a remote URI."""
    if uri.startswith("/"):
        path = uri
    elif uri.lower().startswith("file:"):
        parts = _split(uri, key)
        if parts.netloc not in ("", "localhost"):
            raise BadRequest(f"{key}: file URIs must name a local path "
                             f"(file:///...), not host {parts.netloc!r}")
        path = unquote(parts.path)
        _clean_text(path, key)
        if not path.startswith("/"):
            raise BadRequest(f"{key}: file URI must hold an absolute path")
    else:
        return None
    if ".." in path.split("/"):
        raise BadRequest(f"{key}: '..' is not allowed in paths")
    return path


def inside(path: str, roots: Iterable[str]) -> bool:
    """Whether ``path`` (resolved, symlinks included) lies in one of roots."""
    real = os.path.realpath(path)
    return any(real == r or real.startswith(r.rstrip("/") + "/") for r in roots)


def uri(value: str, key: str, roots: Iterable[str], *, target: bool = False) -> str:
    """Check an image source (or, with ``target``, a save target) URI."""
    _clean_text(value, key)
    if value != value.strip():
        raise BadRequest(f"{key} must not start or end with spaces")
    roots = tuple(roots)
    path = local_path(value, key)
    if path is not None:
        where = os.path.dirname(path) if target else path
        if not inside(where, roots):
            raise BadRequest(f"{key} {value!r} is outside the storage roots "
                             f"({', '.join(roots)})")
        if target:
            if not os.path.isdir(os.path.dirname(path)):
                raise BadRequest(f"{key}: folder {os.path.dirname(path)!r} "
                                 "does not exist")
            if os.path.isdir(path):
                raise BadRequest(f"{key}: {path!r} is a folder, not a file")
        elif os.path.isdir(path):
            raise BadRequest(f"{key}: {path!r} is a folder, not a file")
        elif not os.path.isfile(path):
            raise BadRequest(f"{key}: no such file {path!r}")
        return value
    parts = _split(value, key)
    scheme = parts.scheme.lower()
    if scheme not in REMOTE_SCHEMES:
        raise BadRequest(
            f"{key} {value[:80]!r} is not allowed: use an absolute path or a "
            "file://, http://, https:// or ftp:// URI")
    if not parts.hostname:
        raise BadRequest(f"{key} {value[:80]!r} has no host")
    try:
        parts.port
    except ValueError:
        raise BadRequest(f"{key} {value[:80]!r} has a bad port") from None
    if not parts.path or parts.path.endswith("/"):
        raise BadRequest(f"{key} {value[:80]!r} must name a file")
    return value


def start_params(params: Mapping[str, object], roots: Iterable[str]) -> dict:
    """Validate a start request; return its normalised parameters."""
    reject_unknown(params, START_REQUIRED + START_OPTIONAL)
    get = lambda key: single(params, key)  # noqa: E731
    roots = tuple(roots)
    out: dict = {
        "name": name(get("name")),
        "cpu_count": integer(get("cpu_count"), "cpu_count", 1, MAX_CPUS),
        "mem_size": integer(get("mem_size"), "mem_size", MIN_MEM_MB,
                            MAX_MEM_MB, " MB"),
    }
    hda = get("hda_image")
    if not hda:
        raise BadRequest("parameter 'hda_image' is required")
    out["hda_image"] = uri(hda, "hda_image", roots)
    for slot in ("hdb", "cd"):
        value = get(f"{slot}_image")
        out[f"{slot}_image"] = uri(value, f"{slot}_image", roots) if value else ""
    for slot in ("hda", "hdb", "cd"):
        out[f"{slot}_image_sha256"] = sha256(get(f"{slot}_image_sha256"),
                                             f"{slot}_image_sha256",
                                             out[f"{slot}_image"])
    for slot in ("hda", "hdb"):
        value = get(f"{slot}_save_to")
        if value and not out[f"{slot}_image"]:
            raise BadRequest(f"{slot}_save_to is set but {slot}_image is not")
        out[f"{slot}_save_to"] = (uri(value, f"{slot}_save_to", roots,
                                      target=True) if value else "")
    soft_list = get("soft_list") or ""
    _clean_text(soft_list, "soft_list")
    run_agent = boolean(get("run_agent"), "run_agent")
    if run_agent is None:
        run_agent = bool(soft_list.strip())
    if run_agent:
        raise BadRequest(
            "the guest agent (run_agent, soft_list) is not available in this "
            "worker yet; start without it, or pass run_agent=false to start "
            "without installing soft_list")
    out["run_agent"] = False
    out["soft_list"] = soft_list
    given_uuid = get("uuid")
    out["uuid"] = vm_uuid(given_uuid) if given_uuid else ""
    return out


def modify_params(params: Mapping[str, object], roots: Iterable[str]) -> dict:
    """Validate a modify request; return only the fields it changes."""
    reject_unknown(params, SELECTORS + MODIFY_FIELDS)
    roots = tuple(roots)
    changes = {}
    for key in ("hda_save_to", "hdb_save_to"):
        value = single(params, key)
        if value is not None:
            changes[key] = (uri(value, key, roots, target=True)
                            if value else "")
    cd = single(params, "cd_image")
    if cd is not None:
        changes["cd_image"] = uri(cd, "cd_image", roots) if cd else ""
    digest = single(params, "cd_image_sha256")
    if digest is not None:
        if cd is None:
            raise BadRequest("cd_image_sha256 is set but cd_image is not")
        changes["cd_image_sha256"] = sha256(digest, "cd_image_sha256", cd)
    if not changes:
        raise BadRequest("modify needs at least one of "
                         "hda_save_to, hdb_save_to, cd_image; got none")
    return changes


def selector(params: Mapping[str, object], extra: Iterable[str] = ()) -> tuple[str | None, str | None]:
    """The (uuid, name) a request names its VM by; uuid wins."""
    reject_unknown(params, SELECTORS + tuple(extra))
    given_uuid = single(params, "uuid")
    given_name = single(params, "name")
    if given_uuid:
        return vm_uuid(given_uuid), None
    if given_name:
        return None, name(given_name)
    raise BadRequest("name the VM with 'uuid' or 'name'")
