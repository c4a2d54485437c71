"""DER encode/decode of the SGP.22 and SGP.32 messages (our transcriptions in asn1/*.asn).

``encode(type_name, value) -> bytes`` and ``decode(type_name, data) -> value``
use asn1tools' Python value conventions: OCTET STRING = bytes, BIT STRING =
(bytes, number_of_bits), CHOICE = (alternative_name, value), OBJECT IDENTIFIER =
dotted str, NULL = None, SEQUENCE = dict keyed by component name. The compiled
tables, their cache and the asn1tools fixes they need are agent/asn1tables.py's,
loaded on the first encode or decode; ``read_fields`` reads a few fixed layouts
without them.

asn1tools behaviours corrected here because they matter for SGP.22:

* it ignores trailing bytes after the top-level value, and does not bound inner
  elements by their parent's length; ``decode`` checks the whole TLV skeleton
  first, so a short, over-long or padded ES10 response never passes as valid;
* an unknown alternative of an (implicitly extensible) CHOICE decodes as
  (None, None); we reject it rather than hand callers a value they cannot use;
* it silently drops dictionary keys a SEQUENCE does not have; ``encode`` refuses them.
"""
from __future__ import annotations

from . import tlv
from .errors import ProtocolError

Any = object  # annotations only; `typing` is not imported to keep start-up lean


def _tables():
    from . import asn1tables      # on the first encode or decode (or a preload step)
    return asn1tables


# --- public API ----------------------------------------------------------------------

def _check_keys(t: Any, value: Any, path: str) -> None:
    """Reject SEQUENCE/SET keys the type does not have.

    asn1tools silently drops unknown dictionary keys, so a misspelt field name
    (e.g. ``eutranSupportedRelease`` for ``eutranEpcSupportedRelease``) would
    vanish from the message without any error."""
    kind = type(t).__name__
    if kind == "ExplicitTag":
        _check_keys(t.inner, value, path)
    elif kind in ("Sequence", "Set") and isinstance(value, dict):
        members = {m.name: m for m in list(t.root_members or []) + list(t.additions or [])}
        unknown = sorted(set(value) - set(members))
        if unknown:
            raise ValueError(f"cannot encode {path}: unknown field(s) {', '.join(unknown)} "
                             f"(known: {', '.join(members)})")
        for k, v in value.items():
            _check_keys(members[k], v, f"{path}.{k}")
    elif kind in ("SequenceOf", "SetOf") and isinstance(value, list):
        for i, v in enumerate(value):
            _check_keys(t.element_type, v, f"{path}[{i}]")
    elif kind == "Choice" and isinstance(value, tuple) and len(value) == 2:
        m = t.name_to_member.get(value[0])
        if m is not None:
            _check_keys(m, value[1], f"{path}.{value[0]}")


def encode(type_name: str, value: Any) -> bytes:
    """DER-encode ``value`` as ``type_name``.

    Checks Python types and ASN.1 constraints (SIZE, ranges) first, so a bug in
    our own message building shows up as a clear ValueError here rather than as a
    rejected command on the card.  Raises ValueError on a bad value."""
    tables = _tables()
    t = tables.compiled(type_name, "encode")
    tables.attach_checker(type_name)
    _check_keys(t._type, value, type_name)
    try:
        t.check_types(value)
        t.check_constraints(value)
        return bytes(t.encode(value))
    except Exception as e:  # asn1tools EncodeError/ConstraintsError, or TypeError on odd input
        raise ValueError(f"cannot encode {type_name}: {e}") from e


def decode(type_name: str, data: bytes, *, check_constraints: bool = False) -> Any:
    """Decode DER ``data`` that must be exactly one ``type_name`` value.

    Raises ProtocolError(code="malformed_asn1") on any defect: truncation, a
    length that disagrees with its contents at any nesting level, indefinite
    lengths, wrong tag, missing mandatory components, trailing bytes, or a CHOICE
    alternative this module does not define.  Unknown trailing SEQUENCE components
    are skipped (EXTENSIBILITY IMPLIED: newer cards add optional fields).

    SIZE/range constraints are not checked by default (be liberal in what we
    accept from real cards and servers); ``check_constraints=True`` also rejects
    e.g. a 9-byte ICCID, for the simulated eUICC and server that must be strict."""
    t = _tables().compiled(type_name, "decode")
    data = bytes(data)
    problem = _structure_problem(data)
    if problem:
        raise ProtocolError(f"malformed {type_name}: {problem}", code="malformed_asn1")
    try:
        value, used = t.decode_with_length(data)
    except Exception as e:  # asn1tools DecodeError, IndexError on odd input, ...
        raise ProtocolError(f"malformed {type_name}: {e}", code="malformed_asn1") from e
    if used != len(data):  # cannot happen after _structure_problem; kept as a guard
        raise ProtocolError(f"malformed {type_name}: {len(data) - used} trailing bytes", code="malformed_asn1")
    if _has_unknown_choice(value):
        raise ProtocolError(f"malformed {type_name}: contains a CHOICE alternative (tag) this agent does not know",
                            code="malformed_asn1")
    if check_constraints:
        _tables().attach_checker(type_name)
        try:
            t.check_constraints(value)
        except Exception as e:
            raise ProtocolError(f"malformed {type_name}: {e}", code="malformed_asn1") from e
    return value


def read_fields(type_name: str, data: bytes, outer: int, tags: tuple[int, ...]) -> list[bytes]:
    """The contents of the fields ``tags`` of a ``type_name`` (a SEQUENCE tagged ``outer`` whose
    mandatory fields are these, in this order), read with the TLV parser: no ASN.1 tables are
    loaded, so the first ES10 calls of a command (GetEID, GetEUICCInfo1, GetEUICCChallenge) and
    the LPA's check of serverSigned1 run while those tables load (agent/preload.py).

    Accepts and refuses what decode() does for these types (tests/test_codec.py holds the two
    equal): any defect of the TLV skeleton, another outer tag, a missing or misplaced field are
    ProtocolError(code="malformed_asn1"); unknown components after the known ones are skipped."""
    data = bytes(data)
    problem = _structure_problem(data)
    if problem:
        raise ProtocolError(f"malformed {type_name}: {problem}", code="malformed_asn1")
    try:
        top = tlv.parse_single(data)
        kids = tlv.children(top) if top.constructed else []
    except ProtocolError as e:          # e.g. a tag longer than the TLV parser reads
        raise ProtocolError(f"malformed {type_name}: {e}", code="malformed_asn1") from None
    if top.tag != outer:
        raise ProtocolError(f"malformed {type_name}: tag {top.tag:X}, expected {outer:X}", code="malformed_asn1")
    got = [k.tag for k in kids[:len(tags)]]
    if got != list(tags):
        want = " ".join(f"{t:X}" for t in tags)
        raise ProtocolError(f"malformed {type_name}: expected the fields {want} first, found "
                            f"{' '.join(f'{t:X}' for t in got) or 'none'}", code="malformed_asn1")
    return [k.value for k in kids[:len(tags)]]


def _structure_problem(data: bytes) -> str | None:
    """Check the BER-TLV skeleton: exactly one top-level TLV, and every constructed
    TLV's contents are exactly a sequence of complete TLVs.

    asn1tools does not bound inner elements by their parent's length (an outer
    length one byte short still decoded) and ignores trailing bytes, so this runs
    first.  Returns a description of the first defect, or None."""
    if not data:
        return "no data"
    stack = [(0, len(data))]
    top = True
    while stack:
        off, end = stack.pop()
        while off < end:
            start = off
            first = data[off]
            off += 1
            if first & 0x1F == 0x1F:
                while True:
                    if off >= end:
                        return f"truncated tag at offset {start}"
                    b = data[off]
                    off += 1
                    if not b & 0x80:
                        break
            tag = data[start:off].hex().upper()
            if off >= end:
                return f"missing length after tag {tag} at offset {start}"
            length = data[off]
            off += 1
            if length & 0x80:
                n = length & 0x7F
                if n == 0:
                    return f"indefinite length for tag {tag} (not DER)"
                if n > 4:
                    return f"length of tag {tag} uses {n} bytes"
                if off + n > end:
                    return f"truncated length of tag {tag}"
                length = int.from_bytes(data[off:off + n], "big")
                off += n
            if off + length > end:
                return (f"tag {tag} at offset {start} says {length} bytes but only {end - off} remain"
                        + (" (truncated)" if end == len(data) else " inside its parent"))
            if first & 0x20:
                stack.append((off, off + length))
            off += length
            if top:
                top = False
                if off != len(data):
                    return f"{len(data) - off} trailing bytes after the {off}-byte value"
    return None


def _has_unknown_choice(value) -> bool:
    """asn1tools decodes an unknown alternative of an extensible CHOICE as (None, None)."""
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, dict):
            stack.extend(v.values())
        elif isinstance(v, list):
            stack.extend(v)
        elif isinstance(v, tuple) and len(v) == 2:
            if v[0] is None:
                return True
            if isinstance(v[0], str):   # CHOICE; BIT STRING is (bytes, int)
                stack.append(v[1])
    return False
