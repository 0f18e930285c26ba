"""Tiny x86 boot-sector guests for tests that need a real VM.

Tests of a VM daemon need guests whose behaviour is known exactly (stay up,
power off, write to disk then power off, ...), boot in well under a second and
cost nothing to ship.  A full OS image is none of those, so each guest here is
a single 512-byte real-mode boot sector, assembled at test time from the source
below with GNU binutils (``as`` + ``ld`` + ``objcopy``).  Nothing binary is
checked in, and the source is the documentation of what each guest does.

The guests rely only on what SeaBIOS on QEMU's ``pc`` (i440FX/PIIX4) machine
provides: it loads the boot sector at 0000:7C00 with the boot drive in DL,
serves int 13h disk calls, runs the 18.2 Hz BIOS timer tick at 0040:006C and
maps the PIIX4 ACPI PM registers at I/O 0x600, so that writing SLP_EN with
SLP_TYP=0 to PM1a_CNT (0x604) is a soft power off (QEMU then exits unless it
was started with ``-no-shutdown``).

Public API::

    build_guest(kind, workdir, marker=b"", disk_size=1 << 20) -> Path
    read_marker(image) -> bytes
    KINDS  (the supported kinds)
    GuestBuildError
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import platform
import shutil
import subprocess
import tempfile

__all__ = ["KINDS", "MAX_MARKER", "SECTOR", "GuestBuildError", "build_guest", "read_marker"]

SECTOR = 512
#: Longest marker "write-then-poweroff" accepts.
MAX_MARKER = 64

#: Bump when the generated code changes in a way the source hash would miss
#: (e.g. different assembler/linker flags).
_BUILD_VERSION = "1"


class GuestBuildError(RuntimeError):
    """The boot sector could not be assembled (missing binutils, bad source)."""


# --------------------------------------------------------------------------
# Assembly source.  Everything is linked at 0x7C00 with CS=DS=ES=SS=0.

_PROLOGUE = """\
    .code16
    .text
    .globl _start
_start:
    cli
    xorw %ax, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    movw $0x7C00, %sp
    ljmp $0, $1f                  # some BIOSes jump to 07C0:0000; normalise CS
1:
    movb %dl, boot_drive          # boot drive number handed over by the BIOS
    cld
    sti
"""

# Soft power off through the PIIX4 PM1a_CNT register (SLP_EN=1, SLP_TYP=0),
# then halt forever in case it did not work (e.g. not a `pc` machine).
_POWEROFF = """\
poweroff:
    movw $0x604, %dx
    movw $0x2000, %ax
    outw %ax, %dx
halt_forever:
    sti
    hlt
    jmp halt_forever
"""

_EPILOGUE = """\
boot_drive:
    .byte 0
{data}
    .org 510
    .word 0xAA55
"""

# Guest bodies.  Each one falls through into / jumps to `poweroff` or halts.
_BODIES = {
    # Halt with interrupts on: the vCPU sleeps until the next timer tick, so an
    # idle guest costs (almost) no host CPU and never exits by itself.
    "idle": """\
    jmp halt_forever
""",
    "poweroff": """\
    jmp poweroff
""",
    # Build the sector in RAM at 0000:8000 (zeros + marker) and write it to
    # CHS 0/0/2 (= LBA 1) of the boot drive.  The marker lives only inside this
    # boot sector, so LBA 1 of the image stays zero unless the write happened.
    # Retries with a disk reset; powers off either way so a failed write shows
    # up as a missing marker rather than as a hang.
    "write-then-poweroff": """\
    movw $0x8000, %di
    movw $256, %cx
    xorw %ax, %ax
    rep stosw                     # zero the 512-byte buffer
    movw $marker, %si
    movw $0x8000, %di
    movw $(marker_end - marker), %cx
    rep movsb                     # copy the marker to its start
    movw $3, %bp                  # attempts
write_sector:
    movw $0x0301, %ax             # AH=03h write sectors, AL=1 sector
    movw $0x0002, %cx             # CH=cylinder 0, CL=sector 2
    movb $0, %dh                  # head 0
    movb boot_drive, %dl
    movw $0x8000, %bx             # ES:BX = 0000:8000
    int $0x13
    jnc poweroff
    xorb %ah, %ah                 # AH=00h reset disk system, then retry
    movb boot_drive, %dl
    int $0x13
    decw %bp
    jnz write_sector
    jmp poweroff
""",
    # Sleep 2 s with BIOS int 15h AH=86h (wait CX:DX microseconds).  SeaBIOS
    # counts 1024 Hz RTC periodic interrupts for it and halts in between, so
    # the wait costs no CPU; as QEMU drops (rather than replays) RTC ticks the
    # guest missed, the wait is never shorter than asked.  (The 18.2 Hz tick
    # count at 0040:006C is no good here: under KVM the in-kernel PIT replays
    # the ticks that piled up while the BIOS ran with interrupts off, so the
    # count races ahead for a while after boot.)  Should the call fail (CF
    # set), fall back to waiting for 3 changes of the RTC seconds register.
    "wait-then-poweroff": """\
    movw $0x001E, %cx             # CX:DX = 0x001E8480 = 2,000,000 us
    movw $0x8480, %dx
    movb $0x86, %ah
    int $0x15
    jnc poweroff
    movw $3, %cx
    call rtc_seconds
    movb %al, %bl
wait_second:
    hlt
    call rtc_seconds
    cmpb %al, %bl
    je wait_second
    movb %al, %bl
    loop wait_second
    jmp poweroff
rtc_seconds:                      # AL = CMOS RTC seconds register
    movb $0x00, %al
    outb %al, $0x70
    inb $0x71, %al
    ret
""",
}

#: The guest kinds build_guest() knows.
KINDS = tuple(_BODIES)


def _source(kind: str, marker: bytes) -> str:
    data = ""
    if kind == "write-then-poweroff":
        data = "marker:\n    .byte {}\nmarker_end:\n".format(", ".join(str(b) for b in marker))
    return _PROLOGUE + _BODIES[kind] + _POWEROFF + _EPILOGUE.format(data=data)


# --------------------------------------------------------------------------
# Toolchain.


def _tool(name: str) -> str:
    """Path of binutils tool `name` able to handle i386 code."""
    candidates = [name] if platform.machine().lower() in ("x86_64", "amd64", "i386", "i686") else []
    candidates.append(f"x86_64-linux-gnu-{name}")
    for candidate in candidates:
        path = shutil.which(candidate)
        if path:
            return path
    raise GuestBuildError(
        f"GNU {name} (x86) not found on PATH (tried {', '.join(candidates)}): the test guests are "
        f"assembled at test time, install binutils (e.g. `apt-get install binutils`)"
    )


def _run(cmd: list[str]) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise GuestBuildError(
            f"{' '.join(cmd)} failed with exit status {proc.returncode}:\n{proc.stdout}{proc.stderr}"
        )


def _assemble(source: str, scratch: pathlib.Path) -> bytes:
    """Assemble + link `source` at 0x7C00 into a flat 512-byte boot sector."""
    as_, ld, objcopy = _tool("as"), _tool("ld"), _tool("objcopy")
    src, obj, elf, raw = (scratch / n for n in ("boot.S", "boot.o", "boot.elf", "boot.bin"))
    src.write_text(source)
    _run([as_, "--32", "-o", str(obj), str(src)])
    _run([ld, "-m", "elf_i386", "-nostdlib", "--build-id=none", "-Ttext=0x7c00", "-e", "_start",
          "-o", str(elf), str(obj)])
    _run([objcopy, "-O", "binary", "-j", ".text", str(elf), str(raw)])
    code = raw.read_bytes()
    if len(code) != SECTOR or code[510:] != b"\x55\xaa":
        raise GuestBuildError(f"assembled boot sector is {len(code)} bytes / lacks 0x55AA signature")
    return code


def _boot_sector(kind: str, marker: bytes, workdir: pathlib.Path) -> bytes:
    """The boot sector for (kind, marker), assembled once per workdir.

    Cached as ``guest-cache/<kind>-<hash>.bin``; the hash covers the full
    source (marker included), so editing this module invalidates the cache.
    """
    source = _source(kind, marker)
    digest = hashlib.sha256((_BUILD_VERSION + "\0" + source).encode()).hexdigest()[:16]
    cache_dir = workdir / "guest-cache"
    cached = cache_dir / f"{kind}-{digest}.bin"
    try:
        code = cached.read_bytes()
        if len(code) == SECTOR and code[510:] == b"\x55\xaa":
            return code
    except FileNotFoundError:
        pass
    cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="asm-", dir=cache_dir) as scratch:
        code = _assemble(source, pathlib.Path(scratch))
        tmp = pathlib.Path(scratch) / "out.bin"
        tmp.write_bytes(code)
        os.replace(tmp, cached)  # atomic: concurrent builders never see half a file
    return code


# --------------------------------------------------------------------------
# Public API.


def build_guest(
    kind: str,
    workdir: pathlib.Path,
    marker: bytes = b"",
    disk_size: int = 1 << 20,
) -> pathlib.Path:
    """Create a fresh raw disk image in `workdir` that boots guest `kind`.

    Kinds (see KINDS):

    * ``"idle"``: does nothing, forever, halted with interrupts enabled
      (no CPU use); QEMU never exits by itself.
    * ``"poweroff"``: powers off through ACPI immediately after boot.
    * ``"write-then-poweroff"``: writes a sector holding `marker` (1..64
      bytes, zero padded) to LBA 1 of its own boot disk with BIOS int 13h,
      then powers off; check the result with read_marker().
    * ``"wait-then-poweroff"``: stays up about 2 s (BIOS timer ticks), then
      powers off; for observing the running state before the guest stops.

    The powering-off guests make QEMU exit only without ``-no-shutdown``, and
    only on the ``pc`` machine (PIIX4 ACPI); otherwise they halt forever.

    Returns the image path: `disk_size` bytes (a multiple of 512, at least
    1024), boot sector at offset 0, the rest zero.  Every call creates a new
    image file, so images can be written to (by the guest) independently; the
    assembled boot sectors are cached in `workdir` across calls.

    Raises ValueError for bad arguments and GuestBuildError if the boot
    sector cannot be assembled (e.g. binutils missing).
    """
    if kind not in _BODIES:
        raise ValueError(f"unknown guest kind {kind!r}; expected one of {', '.join(KINDS)}")
    marker = bytes(marker)
    if kind == "write-then-poweroff":
        if not 1 <= len(marker) <= MAX_MARKER:
            raise ValueError(f"marker must be 1..{MAX_MARKER} bytes, got {len(marker)}")
        if marker.endswith(b"\0"):
            raise ValueError("marker must not end with a zero byte (read_marker strips them)")
    elif marker:
        raise ValueError(f"guest kind {kind!r} does not write a marker")
    if disk_size < 2 * SECTOR or disk_size % SECTOR:
        raise ValueError(f"disk_size must be a multiple of {SECTOR} and >= {2 * SECTOR}, got {disk_size}")

    workdir = pathlib.Path(workdir)
    code = _boot_sector(kind, marker, workdir)
    fd, name = tempfile.mkstemp(prefix=f"guest-{kind}-", suffix=".img", dir=workdir)
    with os.fdopen(fd, "wb") as f:
        f.write(code)
        f.truncate(disk_size)  # sparse zero fill
    return pathlib.Path(name)


def read_marker(image: pathlib.Path) -> bytes:
    """Bytes of LBA 1 (offset 512..1024) of `image`, trailing zeros stripped.

    This is where "write-then-poweroff" puts its marker; a fresh image gives b"".
    """
    with open(image, "rb") as f:
        f.seek(SECTOR)
        return f.read(SECTOR).rstrip(b"\0")
