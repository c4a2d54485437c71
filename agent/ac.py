"""Activation Codes (SGP.22 §4.1, docs/protocol.md §5).

    [LPA:]AC_Format "$" SM-DP+Address "$" AC_Token ["$" SM-DP+OID ["$" CCRequiredFlag ["$" CIPKId]]]

AC_Format must be "1".  The address and the token field are mandatory, the token
may be empty (SGP.22 allows a download with an empty matchingId).  Optional fields
may be left empty as placeholders (``1$host$tok$$1``).  A QR code carries the
prefix ``LPA:``, compared without regard to case.

Each defect has its own InputError code so scripts can tell them apart, and the
message says what to fix.  Codes: ac_empty, ac_too_long, ac_bad_characters,
ac_bad_format, ac_unsupported_format, ac_missing_fields, ac_empty_address,
ac_bad_address, ac_bad_matching_id, ac_bad_oid, ac_bad_cc_flag, ac_bad_ci_pkid, ac_extra_fields;
reading: ac_missing, ac_twice, ac_file_unreadable.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import InputError, UsageError

TYPE_CHECKING = False   # typing's import (~5 ms) only for checkers: annotations are strings here
if TYPE_CHECKING:
    from typing import TextIO

PREFIX = "LPA:"
MAX_LENGTH = 255            # SGP.32 ProfileDownloadData bounds the AC at 255 characters
_MAX_FIELDS = 6             # format, address, token, OID, CC flag, CI PKId (v3)
_FIELD_NAMES = ("AC_Format", "SM-DP+ address", "AC_Token (matching ID)", "SM-DP+ OID",
                "Confirmation Code Required flag", "CI public key ID")
_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
_OID = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))+")
_HEX = re.compile(r"(?:[0-9A-Fa-f]{2}){1,64}")
_MATCHING_ID = re.compile(r"[0-9A-Z-]*")     # SGP.22 §4.1: 0-9, A-Z and "-"
_MAX_LABEL = 63                              # RFC 1035 §2.3.4
_MAX_HOST = 253


@dataclass(frozen=True)
class ActivationCode:
    """An activation code's fields (SGP.22 §4.1)."""
    address: str                 # SM-DP+ address, lower case, optionally host:port (test servers)
    matching_id: str             # AC_Token, sent as ctxParams1.matchingId; may be ""
    oid: str | None = None       # SM-DP+ OID to check against CERT.DPauth, if given
    cc_required: bool = False    # a Confirmation Code is expected (the server's ccRequiredFlag rules)
    ci_pkid: str | None = None   # v3 CI public key identifier, upper-case hex
    raw: str = ""                # the text as given

    def __str__(self) -> str:
        """Canonical form (no LPA: prefix, trailing empty fields dropped)."""
        fields = ["1", self.address, self.matching_id, self.oid or "", "1" if self.cc_required else "",
                  self.ci_pkid or ""]
        while len(fields) > 3 and not fields[-1]:
            fields.pop()
        return "$".join(fields)

    def to_json(self) -> dict:
        return {"address": self.address, "matching_id": self.matching_id, "oid": self.oid,
                "cc_required": self.cc_required, "ci_pkid": self.ci_pkid}

    @classmethod
    def parse(cls, text: str) -> "ActivationCode":
        return parse_activation_code(text)


def _fail(code: str, message: str) -> InputError:
    return InputError(message, code=code)


def _bad_char(text: str) -> tuple[int, str] | None:
    """The first white-space or control/format/unassigned (Unicode category C*) character."""
    if text.isascii():          # the usual case, without loading unicodedata: C0 controls and DEL
        for i, ch in enumerate(text):
            if ch.isspace() or ch < " " or ch == "\x7f":
                return i, ch
        return None
    import unicodedata
    for i, ch in enumerate(text):
        if ch.isspace() or unicodedata.category(ch)[0] == "C":
            return i, ch
    return None


def validate_address(address: str, *, what: str = "SM-DP+ address") -> str:
    """Check an SM-DP+ (or SM-DS) address and return it in lower case.

    A hostname (FQDN or single label such as ``localhost``), optionally with
    ``:port`` for local test servers; no scheme, path, or user part (the address
    goes into https://<address>/gsma/rsp2/... and is compared with serverAddress)."""
    address = address.strip() if isinstance(address, str) else address    # surrounding blanks: not part of it
    if address is None or address == "":
        raise _fail("ac_empty_address", f"the {what} is empty")
    _not_an_activation_code(address, what)
    bad = _bad_char(address)
    if bad:
        raise _fail("ac_bad_address", f"the {what} {address!r} contains {_describe(bad[1])}")
    a = address.lower()
    if "://" in a or "/" in a or "@" in a:
        raise _fail("ac_bad_address", f"the {what} {address!r} must be a bare hostname "
                                      "(no https://, path or user part), e.g. smdp.example.com")
    host, port = a, None
    if ":" in a:
        host, _, port = a.rpartition(":")
        if not port.isdigit() or not port.isascii() or not 1 <= int(port) <= 65535 or port.startswith("0"):
            raise _fail("ac_bad_address", f"the {what} {address!r} has a bad port (want 1-65535)")
    if len(host) > _MAX_HOST:
        raise _fail("ac_bad_address", f"the {what} is {len(host)} characters long; a host name has at most "
                                      f"{_MAX_HOST}")
    labels = host.split(".")
    for label in labels:
        if len(label) > _MAX_LABEL:
            raise _fail("ac_bad_address", f"the {what} has a label ({label[:12]}…) that is {len(label)} characters "
                                          f"long; a DNS label has at most {_MAX_LABEL}")
        if not label.isascii() or not _LABEL.fullmatch(label):
            why = "an empty label (two dots, or a dot at either end)" if not label else f"the label {label!r}"
            raise _fail("ac_bad_address", f"the {what} {address!r} is not a hostname: {why} "
                                          "(letters, digits and inner hyphens only)")
    return a


def _not_an_activation_code(address: str, what: str) -> None:
    """`chip set-default-dp 'LPA:1$smdp.example.com$ID'`: say that an address is wanted, and
    which one the code holds, instead of a puzzling complaint about a port."""
    body = address[len(PREFIX):] if address[:len(PREFIX)].upper() == PREFIX else address
    if address[:len(PREFIX)].upper() == PREFIX or "$" in body:
        fields = body.split("$")
        inner = fields[1] if len(fields) > 1 and fields[0] == "1" and fields[1] else None
        raise _fail("ac_bad_address", f"this is an activation code, not an {what}: give just the address"
                    + (f" ({inner})" if inner else ", e.g. smdp.example.com"))


def validate_matching_id(matching_id: str, *, what: str = "matching ID") -> str:
    """SGP.22 §4.1: a matching ID consists of the characters 0-9, A-Z and "-" only (it may be
    empty: the SM-DP+ then finds the order by EID). Returns it unchanged: the SM-DP+ compares
    it exactly, so it is never case-folded for the user."""
    if not isinstance(matching_id, str):
        raise _fail("ac_bad_matching_id", f"the {what} must be text")
    if not _MATCHING_ID.fullmatch(matching_id):
        i, ch = next((i, c) for i, c in enumerate(matching_id) if not _MATCHING_ID.fullmatch(c))
        shown = f"'{ch}'" if ch.isprintable() and ch.isascii() and not ch.isspace() else _describe(ch)
        raise _fail("ac_bad_matching_id", f"the {what} {matching_id!r} contains {shown} at position {i + 1}; "
                                          "SGP.22 §4.1 allows only 0-9, A-Z and '-' (upper case)")
    return matching_id


def parse_activation_code(text: str) -> ActivationCode:
    """Parse and validate one activation code (strict: no surrounding whitespace)."""
    if text is None or text == "":
        raise _fail("ac_empty", "the activation code is empty")
    body = text[len(PREFIX):] if text[:len(PREFIX)].upper() == PREFIX else text
    if len(body) > MAX_LENGTH:
        prefix = f" ({len(body)} after its {text[:len(PREFIX)]} prefix)" if len(body) != len(text) else ""
        raise _fail("ac_too_long", f"the activation code is {len(text)} characters long{prefix}; at most "
                                   f"{MAX_LENGTH} are allowed, not counting an LPA: prefix")
    bad = _bad_char(text)
    if bad:
        raise _fail("ac_bad_characters", f"the activation code contains {_describe(bad[1])} at position "
                                         f"{bad[0] + 1}; copy it again without spaces or line breaks")
    fields = body.split("$")
    fmt = fields[0]
    if not fmt.isdigit() or not fmt.isascii():
        raise _fail("ac_bad_format", "this is not an activation code: it must look like "
                                     "LPA:1$SMDP.ADDRESS$MATCHING-ID")
    if fmt != "1":
        raise _fail("ac_unsupported_format", f"activation code format {fmt!r} is not supported "
                                             "(only format 1 is defined, SGP.22 §4.1)")
    if len(fields) < 3:
        missing = _FIELD_NAMES[len(fields)]
        raise _fail("ac_missing_fields", f"the activation code has {len(fields)} '$'-separated field(s) but needs "
                                         f"at least 3 (1$ADDRESS$MATCHING-ID); the {missing} is missing")
    if len(fields) > _MAX_FIELDS:
        raise _fail("ac_extra_fields", f"the activation code has {len(fields)} '$'-separated fields; SGP.22 defines "
                                       f"at most {_MAX_FIELDS} ({', '.join(_FIELD_NAMES)}) — is a '$' part of "
                                       "a value, or were two codes pasted together?")
    address = validate_address(fields[1])
    token = fields[2]
    oid = fields[3] if len(fields) > 3 and fields[3] else None
    if oid is not None and not _OID.fullmatch(oid):
        raise _fail("ac_bad_oid", f"the SM-DP+ OID {oid!r} in the activation code is not a dotted-decimal "
                                  "object identifier such as 1.3.6.1.4.1.31746")
    flag = fields[4] if len(fields) > 4 else ""
    if flag not in ("", "0", "1"):
        raise _fail("ac_bad_cc_flag", f"the Confirmation Code Required flag is {flag!r}; it must be 1, 0 or empty")
    ci_pkid = fields[5] if len(fields) > 5 and fields[5] else None
    if ci_pkid is not None:
        if not _HEX.fullmatch(ci_pkid):
            raise _fail("ac_bad_ci_pkid", f"the CI public key ID {ci_pkid!r} is not a hex string "
                                          "(an even number of 0-9/A-F digits)")
        ci_pkid = ci_pkid.upper()
    validate_matching_id(token, what="matching ID (AC_Token)")
    return ActivationCode(address=address, matching_id=token, oid=oid, cc_required=flag == "1",
                          ci_pkid=ci_pkid, raw=text)


def _describe(ch: str) -> str:
    if ch == " ":
        return "a space"
    if ch in "\r\n":
        return "a line break"
    if ch == "\t":
        return "a tab"
    return f"the character U+{ord(ch):04X}"


# --- reading from the command line -------------------------------------------------------

_MAX_FILE = 4096


def read_activation_code(arg: str | None, ac_file: str | None, stdin: TextIO | None) -> ActivationCode:
    """The activation code from the command-line argument, or from ``--ac-file``
    (``-`` = standard input), stripped of surrounding whitespace.

    When an argument fails to parse in a way typical of an unquoted ``$`` (the
    shell replaced ``$SMDP`` by nothing), the message says how to quote it."""
    if arg is not None and ac_file is not None:
        raise UsageError("give the activation code either as an argument or with --ac-file, not both",
                         code="ac_twice")
    if arg is None and ac_file is None:
        raise UsageError("no activation code: pass it as an argument (in single quotes) or with --ac-file FILE",
                         code="ac_missing")
    if ac_file is not None:
        text = _read_file(ac_file, stdin).strip().lstrip("\ufeff").strip()
        src = "standard input" if ac_file == "-" else ac_file
        if "\n" in text:
            raise _fail("ac_bad_characters", f"{src} holds more than one line; put only the activation code in it")
        try:
            return parse_activation_code(text)
        except InputError as e:
            raise InputError(f"{src}: {e.message}", code=e.code) from None
    text = arg.strip()
    try:
        return parse_activation_code(text)
    except InputError as e:
        hint = _shell_hint(text, e.code)
        if hint:
            raise InputError(f"{e.message}. {hint}", code=e.code, details={"hint": hint}) from None
        raise


def _shell_hint(text: str, code: str) -> str:
    body = text[len(PREFIX):] if text[:len(PREFIX)].upper() == PREFIX else text
    mangled = (
        ("$" not in body and body[:1] == "1")               # LPA:1$SMDP$TOKEN -> LPA:1 / 1.io ...
        or (code == "ac_missing_fields" and body.startswith("1$"))
        or code in ("ac_empty", "ac_empty_address")         # 1$$TOKEN after "$smdp" vanished
    )
    if not mangled:
        return ""
    return ("The shell may have expanded the '$' parts of the code: quote it with single quotes "
            "('LPA:1$smdp.example.com$TOKEN') or use --ac-file")


def _read_file(path: str, stdin: TextIO | None) -> str:
    if path == "-":
        if stdin is None:
            raise _fail("ac_file_unreadable", "--ac-file - reads standard input, but there is none")
        try:
            data = stdin.read(_MAX_FILE + 1)
        except (OSError, UnicodeDecodeError) as e:
            raise _fail("ac_file_unreadable", f"cannot read the activation code from standard input: {e}") from None
    else:
        try:
            with open(path, "rb") as f:
                raw = f.read(_MAX_FILE + 1)
        except OSError as e:
            raise _fail("ac_file_unreadable",
                        f"cannot read the activation code file {path}: {e.strerror or e}") from None
        try:
            data = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise _fail("ac_file_unreadable", f"{path} is not UTF-8 text; it should hold the activation code "
                                              "as text (LPA:1$...)") from None
    if len(data) > _MAX_FILE:
        raise _fail("ac_too_long", f"{'standard input' if path == '-' else path} is larger than {_MAX_FILE} bytes; "
                                   "it should hold just the activation code")
    return data
