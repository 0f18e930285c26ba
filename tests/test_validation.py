"""Request parameter checks: vmworker.validation (pure, tmp_path for files).

A storage root is made in tmp_path with images inside it, and files,
folders and symlinks outside it, so that every way out of the roots is
tried. Every refusal must be a BadRequest (HTTP 400) whose message says what
was wrong.
"""

from __future__ import annotations

import os
import pathlib

import pytest

from vmworker import validation as v
from vmworker.errors import BadRequest, VMWorkerError

UUID = "6f1c2a9e-0b7d-4c51-9a8e-2d4f3b6a7c10"


class Store:
    """A storage root with images, and things outside it."""

    def __init__(self, tmp: pathlib.Path):
        tmp = pathlib.Path(os.path.realpath(tmp))
        self.root = tmp / "storage"
        self.outside = tmp / "outside"
        for d in (self.root / "out", self.root / "images", self.outside):
            d.mkdir(parents=True)
        self.hda = self.root / "images" / "hda.qcow2"
        self.hdb = self.root / "images" / "hdb.raw"
        self.cd = self.root / "images" / "boot.iso"
        self.secret = self.outside / "secret.img"
        for f in (self.hda, self.hdb, self.cd, self.secret):
            f.write_bytes(b"\0" * 512)
        # symlinks inside the root: one stays inside, two lead out
        self.link_in = self.root / "link-in.img"
        self.link_in.symlink_to(self.hda)
        self.link_out = self.root / "link-out.img"
        self.link_out.symlink_to(self.secret)
        self.dir_out = self.root / "dir-out"
        self.dir_out.symlink_to(self.outside, target_is_directory=True)
        # a sibling whose name starts like the root
        self.sibling = tmp / "storage2"
        self.sibling.mkdir()
        (self.sibling / "x.img").write_bytes(b"x")
        self.roots = (str(self.root),)

    def start(self, **over) -> dict:
        """Valid start parameters, as strings; None removes a key."""
        params = {"name": "vm1", "cpu_count": "2", "mem_size": "512",
                  "hda_image": str(self.hda)}
        params.update(over)
        return {k: val for k, val in params.items() if val is not None}


@pytest.fixture
def st(tmp_path) -> Store:
    return Store(tmp_path)


def refused(func, *args, **kwargs) -> str:
    """Call ``func``; it must raise BadRequest; return the lowered message."""
    with pytest.raises(BadRequest) as info:
        func(*args, **kwargs)
    assert info.value.http_status == 400
    message = str(info.value)
    assert message
    return message.lower()


def test_bad_request_is_400():
    assert BadRequest.http_status == 400
    assert issubclass(BadRequest, VMWorkerError)


# -- start: the happy path ----------------------------------------------------


def test_minimal_start_is_normalised(st):
    out = v.start_params(st.start(), st.roots)
    assert out == {
        "name": "vm1", "cpu_count": 2, "mem_size": 512,
        "hda_image": str(st.hda), "hdb_image": "", "cd_image": "",
        "hda_save_to": "", "hdb_save_to": "",
        "run_agent": False, "soft_list": "", "uuid": "",
        "hda_image_sha256": "", "hdb_image_sha256": "", "cd_image_sha256": "",
    }


def test_full_start_is_accepted(st):
    out = v.start_params(st.start(
        hda_save_to=str(st.root / "out" / "hda.qcow2"),
        hdb_image="file://" + str(st.hdb),
        hdb_save_to="http://store.example/up/hdb.raw",
        cd_image="https://mirror.example/boot.iso",
        run_agent="false", soft_list="", uuid=UUID), st.roots)
    assert out["hdb_image"] == "file://" + str(st.hdb)
    assert out["hda_save_to"] == str(st.root / "out" / "hda.qcow2")
    assert out["hdb_save_to"] == "http://store.example/up/hdb.raw"
    assert out["cd_image"] == "https://mirror.example/boot.iso"
    assert out["uuid"] == UUID
    assert out["run_agent"] is False


def test_same_request_gives_equal_parameters(st):
    """An idempotent retry of start compares equal to the first request."""
    first = v.start_params(st.start(uuid=UUID), st.roots)
    again = v.start_params(st.start(uuid=UUID), st.roots)
    assert first == again
    # spellings of the same numbers and flags normalise to the same values
    assert v.start_params(st.start(uuid=UUID, cpu_count="02",
                                   mem_size=" 512 ", run_agent="no",
                                   soft_list=""), st.roots) == first


def test_start_does_not_change_its_input(st):
    params = st.start(uuid=UUID)
    copy = dict(params)
    v.start_params(params, st.roots)
    assert params == copy


# -- start: required, repeated, unknown ----------------------------------------


@pytest.mark.parametrize("key", v.START_REQUIRED)
@pytest.mark.parametrize("how", ["absent", "empty"])
def test_each_required_parameter(st, key, how):
    params = st.start(**{key: None if how == "absent" else ""})
    msg = refused(v.start_params, params, st.roots)
    assert key in msg and "required" in msg


@pytest.mark.parametrize("key", ["name", "cpu_count", "hda_image", "uuid",
                                 "hda_save_to"])
def test_repeated_parameter_is_refused(st, key):
    params = st.start(uuid=UUID)
    params[key] = [params.get(key, "x"), "y"]
    msg = refused(v.start_params, params, st.roots)
    assert key in msg and "2 times" in msg


def test_non_text_parameter_is_refused(st):
    msg = refused(v.start_params, st.start(cpu_count=2), st.roots)
    assert "cpu_count" in msg and "text" in msg


def test_unknown_parameters_are_named(st):
    msg = refused(v.start_params, st.start(cpus="2", hdc_image="/x"),
                  st.roots)
    assert "unknown" in msg and "'cpus'" in msg and "'hdc_image'" in msg
    assert "allowed" in msg and "cpu_count" in msg


# -- names --------------------------------------------------------------------

GOOD_NAMES = ["a", "A", "0", "vm1", "web-01.example_com", "9lives",
              "a" * 64, "x.-_"]
BAD_NAMES = [
    "a" * 65,
    ".hidden", "-dash", "_under",
    "has space", " lead", "trail ",
    "a/b", "../etc", "a\\b",
    "vmé", "ｖｍ", "vm\u0661", "vm\u200b",
    "vm\n", "vm\x00", "a:b", "a;b", "a$b",
]


@pytest.mark.parametrize("good", GOOD_NAMES)
def test_good_names(good):
    assert v.name(good) == good


@pytest.mark.parametrize("bad", BAD_NAMES)
def test_bad_names(bad):
    msg = refused(v.name, bad)
    assert "not allowed" in msg
    assert "64" in msg and "a-z" in msg  # says what is allowed


@pytest.mark.parametrize("empty", [None, ""])
def test_empty_name_is_required(empty):
    assert "required" in refused(v.name, empty)


def test_bad_name_in_start(st):
    msg = refused(v.start_params, st.start(name="bad name"), st.roots)
    assert "name" in msg and "'bad name'" in msg


def test_very_long_name_is_cut_in_the_message():
    msg = refused(v.name, "x" * 5000 + " ")
    assert len(msg) < 400


# -- numbers ------------------------------------------------------------------


@pytest.mark.parametrize("key,value,words", [
    ("cpu_count", "two", ["whole number"]),
    ("cpu_count", "-1", ["whole number"]),
    ("cpu_count", "+1", ["whole number"]),
    ("cpu_count", "1.5", ["whole number"]),
    ("cpu_count", "1e3", ["whole number"]),
    ("cpu_count", "0x10", ["whole number"]),
    ("cpu_count", "٣", ["whole number"]),       # a non-ASCII digit
    ("cpu_count", "1 2", ["whole number"]),
    ("cpu_count", "0", ["from 1 to 255", "not 0"]),
    ("cpu_count", "256", ["from 1 to 255", "not 256"]),
    ("cpu_count", "99999999999999999999", ["whole number"]),
    ("mem_size", "lots", ["whole number", "mb"]),
    ("mem_size", "-512", ["whole number"]),
    ("mem_size", "512.0", ["whole number"]),
    ("mem_size", "1e3", ["whole number"]),
    ("mem_size", "0", ["not 0", "mb"]),
    ("mem_size", "15", ["from 16", "not 15"]),
    ("mem_size", str((4 << 20) + 1), ["to 4194304", "mb"]),
])
def test_bad_numbers(st, key, value, words):
    msg = refused(v.start_params, st.start(**{key: value}), st.roots)
    assert key in msg
    for word in words:
        assert word in msg


@pytest.mark.parametrize("cpu,mem", [("1", "16"), ("255", str(4 << 20)),
                                     ("8", "2048")])
def test_numbers_at_the_limits(st, cpu, mem):
    out = v.start_params(st.start(cpu_count=cpu, mem_size=mem), st.roots)
    assert (out["cpu_count"], out["mem_size"]) == (int(cpu), int(mem))
    assert type(out["cpu_count"]) is int and type(out["mem_size"]) is int


# -- image URIs ---------------------------------------------------------------


def test_local_images_inside_the_roots(st):
    for value in (str(st.hda), "file://" + str(st.hda),
                  "file://localhost" + str(st.hda), str(st.link_in)):
        assert v.uri(value, "hda_image", st.roots) == value


@pytest.mark.parametrize("value,words", [
    ("images/hda.qcow2", ["not allowed", "absolute path"]),
    ("hda.qcow2", ["not allowed"]),
    ("javascript:alert(1)", ["not allowed"]),
    ("gopher://host/1file", ["not allowed"]),
    ("data:,abc", ["not allowed"]),
    ("sftp://host/x.img", ["not allowed"]),
    ("http:///x.img", ["no host"]),
    ("http://", ["no host"]),
    ("https:x.img", ["no host"]),
    ("http://host/", ["must name a file"]),
    ("http://host", ["must name a file"]),
    ("ftp://host/dir/", ["must name a file"]),
    ("http://host:99999/x.img", ["bad port"]),
    ("http://host:port/x.img", ["bad port"]),
    ("http://host/x\x00.img", ["nul"]),
    ("http://host/x\n.img", ["line break"]),
    ("http://host/x\r.img", ["line break"]),
    ("http://host/" + "x" * 5000, ["longer than 4096"]),
])
def test_bad_uris(st, value, words):
    msg = refused(v.uri, value, "hda_image", st.roots)
    assert "hda_image" in msg
    for word in words:
        assert word in msg


@pytest.mark.parametrize("value", [
    "http://mirror.example/images/hda.qcow2",
    "https://mirror.example:8443/a/b/hda.raw?token=1",
    "ftp://user:pw@ftp.example/pub/hda.img",
    "HTTP://MIRROR.EXAMPLE/X.IMG",
    "http://[2001:db8::1]/hda.img",
    "http://10.0.0.1:8080/hda.img",
])
def test_good_remote_uris(st, value):
    assert v.uri(value, "hda_image", st.roots) == value


def test_path_with_dotdot_is_refused_even_if_it_ends_inside(st):
    sneaky = str(st.root / "images" / ".." / "images" / "hda.qcow2")
    assert "'..'" in refused(v.uri, sneaky, "hda_image", st.roots)
    escaping = str(st.root / ".." / "outside" / "secret.img")
    assert "'..'" in refused(v.uri, escaping, "hda_image", st.roots)
    encoded = "file://" + str(st.root) + "/%2e%2e/outside/secret.img"
    assert "'..'" in refused(v.uri, encoded, "hda_image", st.roots)


@pytest.mark.parametrize("which", ["secret", "sibling", "etc"])
def test_path_outside_the_roots_is_refused(st, which):
    path = {"secret": str(st.secret), "sibling": str(st.sibling / "x.img"),
            "etc": "/etc/passwd"}[which]
    for value in (path, "file://" + path):
        msg = refused(v.uri, value, "hda_image", st.roots)
        assert "outside the storage roots" in msg
        assert str(st.root).lower() in msg  # says where images may be


def test_symlink_inside_the_roots_leading_out_is_refused(st):
    msg = refused(v.uri, str(st.link_out), "hda_image", st.roots)
    assert "outside the storage roots" in msg
    msg = refused(v.uri, str(st.dir_out / "secret.img"), "hda_image",
                  st.roots)
    assert "outside the storage roots" in msg


def test_file_uri_with_a_host_is_refused(st):
    msg = refused(v.uri, "file://otherhost" + str(st.hda), "hda_image",
                  st.roots)
    assert "local path" in msg and "otherhost" in msg
    msg = refused(v.uri, "file://otherhost/", "hda_image", st.roots)
    assert "otherhost" in msg


def test_file_uri_must_be_absolute(st):
    msg = refused(v.uri, "file:images/hda.qcow2", "hda_image", st.roots)
    assert "absolute" in msg


def test_file_uri_with_encoded_nul_is_refused(st):
    msg = refused(v.uri, "file://" + str(st.hda) + "%00.txt", "hda_image",
                  st.roots)
    assert "nul" in msg


def test_missing_image_is_refused(st):
    missing = str(st.root / "images" / "nope.img")
    msg = refused(v.uri, missing, "hda_image", st.roots)
    assert "no such file" in msg and "nope.img" in msg


def test_folder_is_not_an_image(st):
    msg = refused(v.uri, str(st.root / "images"), "hda_image", st.roots)
    assert "images" in msg


def test_no_roots_means_no_local_images(st):
    assert "outside" in refused(v.uri, str(st.hda), "hda_image", ())


def test_bad_image_in_start_names_the_parameter(st):
    for key in ("hda_image", "hdb_image", "cd_image"):
        msg = refused(v.start_params, st.start(**{key: str(st.secret)}),
                      st.roots)
        assert key in msg and "outside" in msg


@pytest.mark.parametrize("value", ["http://[::1/hda.img",
                                   "file://[bad/hda.img"])
def test_malformed_uri_is_a_bad_request(st, value):
    msg = refused(v.uri, value, "hda_image", st.roots)
    assert "hda_image" in msg


# -- save targets -------------------------------------------------------------


@pytest.mark.parametrize("value", [
    "{root}/out/new.qcow2",            # does not exist yet: fine
    "file://{root}/out/new.qcow2",
    "{root}/new.qcow2",                # straight in the root
    "http://store.example/up/hda.qcow2",
    "ftp://store.example/up/hda.qcow2",
])
def test_good_save_targets(st, value):
    value = value.format(root=st.root)
    assert v.uri(value, "hda_save_to", st.roots, target=True) == value


@pytest.mark.parametrize("value,words", [
    ("{root}/missing/new.qcow2", ["folder", "does not exist"]),
    ("{root}/out", ["folder, not a file"]),
    ("{root}/out/", ["folder, not a file"]),
    ("{outside}/new.qcow2", ["outside the storage roots"]),
    ("{root}/dir-out/new.qcow2", ["outside the storage roots"]),
    ("{root}/../outside/new.qcow2", ["'..'"]),
    ("relative/new.qcow2", ["not allowed"]),
    ("http://store.example/up/", ["must name a file"]),
    ("gopher://store.example/x", ["not allowed"]),
])
def test_bad_save_targets(st, value, words):
    value = value.format(root=st.root, outside=st.outside)
    msg = refused(v.uri, value, "hda_save_to", st.roots, target=True)
    assert "hda_save_to" in msg
    for word in words:
        assert word in msg


def test_save_target_in_start(st):
    target = str(st.root / "out" / "hda.qcow2")
    out = v.start_params(st.start(hda_save_to=target), st.roots)
    assert out["hda_save_to"] == target
    msg = refused(v.start_params,
                  st.start(hda_save_to=str(st.outside / "x.img")), st.roots)
    assert "hda_save_to" in msg and "outside" in msg


def test_hdb_save_to_needs_hdb_image(st):
    msg = refused(v.start_params,
                  st.start(hdb_save_to=str(st.root / "out" / "hdb.raw")),
                  st.roots)
    assert "hdb_save_to" in msg and "hdb_image" in msg
    out = v.start_params(st.start(hdb_image=str(st.hdb),
                                  hdb_save_to=str(st.root / "out" / "b.raw")),
                         st.roots)
    assert out["hdb_save_to"] == str(st.root / "out" / "b.raw")


# -- the guest agent --------------------------------------------------------


@pytest.mark.parametrize("extra", [
    {"run_agent": "true"},
    {"run_agent": "1"},
    {"run_agent": "YES"},
    {"soft_list": "nginx,postgresql"},
    {"soft_list": "nginx", "run_agent": "on"},
])
def test_agent_is_not_available(st, extra):
    msg = refused(v.start_params, st.start(**extra), st.roots)
    assert "agent" in msg and "not available" in msg
    assert "run_agent=false" in msg  # says how to start without it


@pytest.mark.parametrize("word", ["false", "0", "no", "off", "", "False"])
def test_soft_list_with_run_agent_false_is_accepted(st, word):
    out = v.start_params(st.start(soft_list="nginx", run_agent=word),
                         st.roots)
    assert out["run_agent"] is False
    assert out["soft_list"] == "nginx"


def test_run_agent_must_be_a_boolean(st):
    msg = refused(v.start_params, st.start(run_agent="maybe"), st.roots)
    assert "run_agent" in msg and "true or false" in msg


def test_blank_soft_list_does_not_ask_for_the_agent(st):
    assert v.start_params(st.start(soft_list="  "), st.roots)[
        "run_agent"] is False


# -- uuids ------------------------------------------------------------------


def test_canonical_uuid_is_accepted():
    assert v.vm_uuid(UUID) == UUID


def test_uppercase_uuid_is_normalised_to_the_canonical_form():
    # uuids compare case-insensitively (RFC 4122); the worker stores and
    # answers the lowercase form, so a retry in either case compares equal.
    assert v.vm_uuid(UUID.upper()) == UUID


@pytest.mark.parametrize("value", [
    "{" + UUID + "}",
    "urn:uuid:" + UUID,
    UUID.replace("-", ""),
    UUID[:8] + UUID[9:13] + "-" + UUID[8] + UUID[14:],  # hyphen moved
])
def test_non_canonical_uuid_is_refused(value):
    msg = refused(v.vm_uuid, value)
    assert "canonical" in msg and UUID in msg  # says what to send instead


@pytest.mark.parametrize("value", ["", "vm1", "not-a-uuid", UUID[:-1],
                                   UUID + "0", "g" * 32, UUID + "\n"])
def test_malformed_uuid_is_refused(value):
    msg = refused(v.vm_uuid, value)
    assert "uuid" in msg


def test_uuid_in_start(st):
    assert v.start_params(st.start(uuid=UUID.upper()), st.roots)[
        "uuid"] == UUID
    msg = refused(v.start_params, st.start(uuid="{" + UUID + "}"), st.roots)
    assert "uuid" in msg and "canonical" in msg


# -- selector ---------------------------------------------------------------


def test_selector_uuid_wins():
    assert v.selector({"uuid": UUID, "name": "vm1"}) == (UUID, None)
    assert v.selector({"uuid": UUID, "name": "bad name"}) == (UUID, None)


def test_selector_by_name():
    assert v.selector({"name": "vm1"}) == (None, "vm1")
    assert v.selector({"uuid": "", "name": "vm1"}) == (None, "vm1")


def test_selector_needs_uuid_or_name():
    for params in ({}, {"uuid": "", "name": ""}):
        msg = refused(v.selector, params)
        assert "uuid" in msg and "name" in msg


def test_selector_checks_what_it_gets():
    assert "canonical" in refused(v.selector, {"uuid": "{" + UUID + "}"})
    assert "not allowed" in refused(v.selector, {"name": "../x"})
    assert "2 times" in refused(v.selector, {"uuid": [UUID, UUID]})


def test_selector_refuses_unknown_parameters_but_allows_extra():
    msg = refused(v.selector, {"name": "vm1", "force": "1"})
    assert "unknown" in msg and "'force'" in msg
    assert v.selector({"name": "vm1", "force": "1"}, extra=("force",)) == (
        None, "vm1")


# -- modify -------------------------------------------------------------------


def test_modify_returns_only_what_changes(st):
    target = str(st.root / "out" / "new.qcow2")
    assert v.modify_params({"uuid": UUID, "hda_save_to": target},
                           st.roots) == {"hda_save_to": target}
    assert v.modify_params({"name": "vm1", "hdb_save_to": ""},
                           st.roots) == {"hdb_save_to": ""}


def test_modify_cd_insert_and_eject(st):
    assert v.modify_params({"name": "vm1", "cd_image": str(st.cd)},
                           st.roots) == {"cd_image": str(st.cd)}
    assert v.modify_params({"name": "vm1", "cd_image": ""},
                           st.roots) == {"cd_image": ""}


def test_modify_needs_a_change(st):
    msg = refused(v.modify_params, {"uuid": UUID}, st.roots)
    assert "at least one" in msg and "cd_image" in msg


def test_modify_checks_its_values(st):
    msg = refused(v.modify_params, {"name": "vm1",
                                    "hda_save_to": str(st.secret)}, st.roots)
    assert "hda_save_to" in msg and "outside" in msg
    msg = refused(v.modify_params, {"name": "vm1",
                                    "cd_image": str(st.link_out)}, st.roots)
    assert "cd_image" in msg and "outside" in msg
    msg = refused(v.modify_params, {"name": "vm1",
                                    "cd_image": "gopher://h/x.iso"}, st.roots)
    assert "cd_image" in msg and "not allowed" in msg


def test_modify_refuses_unknown_and_repeated(st):
    msg = refused(v.modify_params, {"name": "vm1", "hda_image": "/x"},
                  st.roots)
    assert "unknown" in msg and "'hda_image'" in msg
    msg = refused(v.modify_params, {"name": "vm1", "cd_image": ["", ""]},
                  st.roots)
    assert "cd_image" in msg and "2 times" in msg
