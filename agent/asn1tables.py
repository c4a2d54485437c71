"""The compiled ASN.1 tables behind agent/codec.py: compiling asn1/*.asn with asn1tools,
caching the result, and the asn1tools fixes the tables need.

Start-up cost matters (every CLI command decodes something), so the compiled
specification is pickled once into the user's cache directory, keyed by the
sha256 of the .asn sources and the asn1tools version.  A warm start unpickles it
without importing the top-level ``asn1tools`` package, whose ``__init__`` pulls
in the ASN.1 parser (pyparsing) and every other codec (~75 ms); only the BER/DER
codec modules the pickle refers to are loaded.  This module itself is imported
on the first encode or decode (or by a command's preload steps, agent/preload.py):
a command's first ES10 calls, read with codec.read_fields, need none of it.

The types are pickled in two sets: the base set (SGP.22 and the PKIX modules it
imports, from rsp.asn and pkix.asn) is loaded on first use; the SGP.32 set
(sgp32*.asn) only when one of its types is first asked for, so an SGP.22 command
neither unpickles nor holds it (about 60 % of the compiled tables).  ``has_type``
knows the SGP.32 names without loading them; ``spec()`` loads both.  Inside a set each
type is a pickle of its own (with what it nests), unpickled when it is first asked for:
`chip info` needs six of the 163 base types (~0.3 ms instead of ~5 ms for the whole set);
a download, which needs a few dozen, about as long as before.

asn1tools behaviours corrected here (the decoder's own checks are codec.decode's):

* OBJECT IDENTIFIER decoding splits the first sub-identifier as (v // 40, v % 40)
  even for v >= 80, so ``2.999.10`` (the SM-DP+ OID of test PKIs) came back as
  ``26.39.10``; X.690 §8.19.4 says the first arc is 2 and the second v - 80;
* its DER SEQUENCE OF / SET OF decoder loops for ever (growing a list) on an element
  with the wrong tag, INTEGERs are unbounded and an empty BIT STRING reads the next
  TLV's byte: see ``_patch_der`` and docs/protocol.md §0.8.

(A further asn1tools flaw, making every tag on a CHOICE-based type explicit, is
worked around in the .asn files themselves: see the notes in asn1/rsp.asn and the
"[n] IMPLICIT" places of asn1/sgp32.asn.)
"""
from __future__ import annotations

import os
import sys
import threading

from . import usercache
from .errors import ProtocolError

Any = object  # annotations only; `typing` is not imported to keep start-up lean

_ASN_FILES = ("rsp.asn", "pkix.asn", "sgp32.asn", "sgp32v10.asn")
_BASE_FILES = 2      # the first two (SGP.22 + PKIX) form the base set; the rest the SGP.32 set
_FORMAT = 4          # bump when the pickled layout below changes
_SETS = ("base", "sgp32")
_types: dict[str, Any] | None = None       # name -> compiled type, unpickled so far (None: no set loaded)
_type_blobs: dict[str, bytes] = {}         # name -> its own pickle, of the sets loaded, not unpickled yet
_extra_names: frozenset = frozenset()      # the SGP.32 set's names (known before it is loaded)
_extra_loaded = False
_pending_checkers: list[bytes] = []        # checker pickles of loaded sets, not opened yet
_checker_blobs: dict[str, bytes] = {}      # name -> its checker's own pickle, not attached yet
_lock = threading.Lock()   # first load swaps sys.modules entries: one thread at a time


# --- locating sources --------------------------------------------------------------

def _asn_dir() -> str:
    """Directory holding the .asn files.

    In a source checkout (or an editable install) they live in ``<repo>/asn1``
    next to the ``agent`` package; a wheel ships them as the package
    ``agent.asn1`` (pyproject maps asn1/ there). Paths are strings here: pathlib (with
    urllib.parse) would cost `chip info --sim` ~7 ms of its start-up."""
    here = os.path.dirname(os.path.realpath(__file__))
    for cand in (os.path.join(here, "asn1"), os.path.join(os.path.dirname(here), "asn1")):
        if os.path.isfile(os.path.join(cand, _ASN_FILES[0])):
            return cand
    try:
        from importlib.resources import files
        res = files("agent.asn1")
        cand = str(res)
        if os.path.isfile(os.path.join(cand, _ASN_FILES[0])):
            return cand
    except (ImportError, TypeError, ValueError):
        pass
    raise ProtocolError("ASN.1 definitions not found (expected asn1/rsp.asn next to the agent package); "
                        "reinstall esim-agent", code="asn1_missing")


def asn_sources() -> list[str]:
    d = _asn_dir()
    return [os.path.join(d, name) for name in _ASN_FILES]


def _asn1tools_version() -> str:
    """asn1tools version without importing the package (its __init__ is the slow part)."""
    import importlib.util
    spec = importlib.util.find_spec("asn1tools")
    if spec is None or not spec.submodule_search_locations:
        raise ProtocolError("the asn1tools package is not installed (pip install asn1tools)",
                            code="asn1tools_missing")
    vfile = os.path.join(list(spec.submodule_search_locations)[0], "version.py")
    try:
        with open(vfile, encoding="utf-8") as f:
            return f.read().strip()
    except OSError:
        from importlib.metadata import version
        return version("asn1tools")


def _cache_key(sources: list) -> str:
    h = usercache.sha256()
    h.update(f"esim-agent-codec-{_FORMAT}\0{sys.version_info[:2]}\0{_asn1tools_version()}\0".encode())
    for p in sources:
        with open(p, "rb") as f:
            data = f.read()
        h.update(os.path.basename(p).encode() + b"\0" + len(data).to_bytes(8, "big") + data)
    return h.hexdigest()


# --- asn1tools fixes ---------------------------------------------------------------

def _patch_asn1tools(ber) -> None:
    """Fix OBJECT IDENTIFIER decoding in asn1tools' BER/DER codec (see module doc).

    Also bounds-checks sub-identifiers: asn1tools would read past the end of the
    OID content (into the next TLV) when the last byte has its high bit set."""
    if getattr(ber.ObjectIdentifier, "_esim_agent_fixed", False):
        return

    def decode_content(self, data, offset, length):
        end = offset + length
        if length == 0 or end > len(data):
            raise ber.DecodeError("empty or truncated OBJECT IDENTIFIER")
        arcs: list[int] = []
        value = 0
        pending = False
        for i in range(offset, end):
            b = data[i]
            if not pending and b == 0x80:
                raise ber.DecodeError("OBJECT IDENTIFIER sub-identifier with a leading 0x80 byte")
            value = (value << 7) | (b & 0x7F)
            pending = bool(b & 0x80)
            if not pending:
                arcs.append(value)
                value = 0
        if pending:
            raise ber.DecodeError("OBJECT IDENTIFIER ends inside a sub-identifier")
        first = arcs[0]
        head = [first // 40, first % 40] if first < 80 else [2, first - 80]
        return ".".join(str(v) for v in head + arcs[1:]), end

    ber.ObjectIdentifier.decode_content = decode_content
    der = sys.modules.get("asn1tools.codecs.der")
    if der is not None:
        _patch_der(ber, der)
    ber.ObjectIdentifier._esim_agent_fixed = True


#: Longest INTEGER content we decode.  Every SGP.22 INTEGER is small (results, reasons,
#: sequence numbers) and RFC 5280 caps certificate serial numbers at 20 octets; a longer
#: one only turns into numbers Python cannot print (int -> str stops at 4300 digits) or
#: store (SQLite INTEGER is 64-bit).  docs/protocol.md §0.8.
MAX_INTEGER_OCTETS = 64


def _patch_der(ber, der) -> None:
    """Make asn1tools' DER decoder fail on input it would otherwise loop on or misread.

    * SEQUENCE OF / SET OF (der.ArrayType.decode_content) decodes elements while its
      length is not used up, but an element with the wrong tag comes back as the
      TAG_MISMATCH marker *without consuming a byte*: the loop never ends and the list
      grows until memory runs out (a card answering ``BF2D 04 A0 02 00 00``).  Each
      element must now match and consume bytes, and stay inside its parent.
    * INTEGER / ENUMERATED contents are bounded (MAX_INTEGER_OCTETS).
    * BIT STRING: empty contents made asn1tools read the unused-bits count from the
      next TLV (or past the end); an unused-bits count above 7 gave a negative length.
    * UTCTime and GeneralizedTime (the validity of every certificate an AuthenticateServerResponse
      carries) were read with datetime.strptime, whose first use in a process builds its
      locale-aware regular expressions (~4-5 ms of every download); read here from the fixed DER
      forms YYMMDDHHMMSSZ and YYYYMMDDHHMMSSZ (X.690 §11.7, §11.8) into the same naive datetime,
      UTCTime years 69-99 as 19xx like strptime's %y (a GeneralizedTime with fractions of a
      second still goes to asn1tools)."""
    mismatch = ber.TAG_MISMATCH

    def array_decode_content(self, data, offset, length):
        decoded = []
        end = offset + length
        if end > len(data):
            raise ber.DecodeError(f"{self.type_name} contents run past the end of the data", offset=offset)
        while offset < end:
            value, new_offset = self.element_type.decode(data, offset)
            if value is mismatch:
                raise ber.DecodeTagError(self.element_type, data, offset, location=self.element_type)
            if new_offset <= offset or new_offset > end:
                raise ber.DecodeError(f"{self.type_name} element at offset {offset} does not fit its parent",
                                      offset=offset)
            decoded.append(value)
            offset = new_offset
        return decoded, offset

    def integer_decode_content(self, data, offset, length):
        if length > MAX_INTEGER_OCTETS:
            raise ber.DecodeError(f"INTEGER of {length} octets (at most {MAX_INTEGER_OCTETS} accepted)",
                                  offset=offset)
        return integer_orig(self, data, offset, length)

    def enumerated_decode_content(self, data, offset, length):
        if length > MAX_INTEGER_OCTETS:
            raise ber.DecodeError(f"ENUMERATED of {length} octets (at most {MAX_INTEGER_OCTETS} accepted)",
                                  offset=offset)
        return enumerated_orig(self, data, offset, length)

    def bit_string_decode_content(self, data, offset, length):
        if length < 1 or offset + length > len(data):
            raise ber.DecodeError("BIT STRING without its unused-bits octet", offset=offset)
        unused = data[offset]
        if unused > 7 or (length == 1 and unused):
            raise ber.DecodeError(f"BIT STRING with {unused} unused bits in {length - 1} octets", offset=offset)
        return bit_string_orig(self, data, offset, length)

    def utc_time_to_datetime(string):
        import datetime
        if len(string) == 13 and string[-1] == "Z" and string[:12].isascii() and string[:12].isdigit():
            yy = int(string[0:2])
            try:
                return datetime.datetime(yy + (2000 if yy < 69 else 1900), int(string[2:4]), int(string[4:6]),
                                         int(string[6:8]), int(string[8:10]), int(string[10:12]))
            except ValueError:
                pass
        raise ber.DecodeError(f"Expected a restricted UTC time string, but got '{string}'.")

    def generalized_time_to_datetime(string):
        import datetime
        if len(string) == 15 and string[-1] == "Z" and string[:14].isascii() and string[:14].isdigit():
            try:
                return datetime.datetime(int(string[0:4]), int(string[4:6]), int(string[6:8]),
                                         int(string[8:10]), int(string[10:12]), int(string[12:14]))
            except ValueError:
                raise ber.DecodeError(f"Expected a restricted generalized time string, but got '{string}'.") \
                    from None
        return generalized_orig(string)

    generalized_orig = der.restricted_generalized_time_to_datetime
    der.restricted_utc_time_to_datetime = utc_time_to_datetime
    der.restricted_generalized_time_to_datetime = generalized_time_to_datetime
    integer_orig = der.Integer.decode_content
    enumerated_orig = ber.Enumerated.decode_content
    bit_string_orig = der.BitString.decode_content
    der.ArrayType.decode_content = array_decode_content
    der.Integer.decode_content = integer_decode_content
    ber.Enumerated.decode_content = enumerated_decode_content
    der.BitString.decode_content = bit_string_decode_content


class _LightAsn1tools:
    """Context manager: make asn1tools.codecs.* importable without running
    asn1tools/__init__.py.

    The package __init__ imports the parser (pyparsing) and every codec; unpickling
    a compiled DER specification only needs the BER/DER codec modules.  Those
    reference ``asn1tools.parser.EXTENSION_MARKER`` (which is None), so a stand-in
    module provides it.  Both stand-ins are removed on exit so a later
    ``import asn1tools`` (e.g. to compile) gets the real package; the codec
    modules already loaded are reused by it."""

    def __enter__(self):
        import importlib.util
        import types
        self.stubs = []
        if "asn1tools" in sys.modules:
            return self
        spec = importlib.util.find_spec("asn1tools")
        if spec is None or not spec.submodule_search_locations:
            raise ProtocolError("the asn1tools package is not installed (pip install asn1tools)",
                                code="asn1tools_missing")
        pkg = types.ModuleType("asn1tools")
        pkg.__path__ = list(spec.submodule_search_locations)
        pkg.__package__ = "asn1tools"
        sys.modules["asn1tools"] = pkg
        self.stubs.append("asn1tools")
        if "asn1tools.parser" not in sys.modules:
            parser = types.ModuleType("asn1tools.parser")
            parser.EXTENSION_MARKER = None
            sys.modules["asn1tools.parser"] = parser
            self.stubs.append("asn1tools.parser")
        return self

    def __exit__(self, *exc):
        for name in self.stubs:
            sys.modules.pop(name, None)
        return False


def _codec_module():
    with _LightAsn1tools():
        import asn1tools.codecs.ber as ber
        import asn1tools.codecs.der  # noqa: F401
    return ber


_ALPHABET_MODULE = "asn1tools.codecs.permitted_alphabet"


def _install_permitted_alphabet() -> None:
    """Provide asn1tools.codecs.permitted_alphabet with the same constants, built fast.

    The constraints checkers (needed to encode) import it, and its BMP_STRING (every
    BMP code point but the surrogates) is built there from a 63,488-element list of
    one-character strings: ~10 ms and a 5 MB peak on every CLI run that encodes.
    Here the same string comes from UTF-16 bytes (~1 ms, no peak). Only the asn1tools
    release it was checked against (tests/test_asn1.py compares the constants)."""
    if _ALPHABET_MODULE in sys.modules:
        return
    import string
    import types
    if _asn1tools_version() != "__version__ = '0.169.0'":
        return
    m = types.ModuleType(_ALPHABET_MODULE, "Permitted alphabet.")
    m.string, m.unichr = string, chr
    m.NUMERIC_STRING = " 0123456789"
    m.PRINTABLE_STRING = string.ascii_uppercase + string.ascii_lowercase + string.digits + " '()+,-./:=?"
    m.IA5_STRING = bytes(range(128)).decode("ascii")
    b = bytearray(0x20000)                    # UTF-16-LE of U+0000..U+FFFF
    b[0::2] = bytes(range(256)) * 256
    b[1::2] = b"".join(bytes([i]) * 256 for i in range(256))
    m.BMP_STRING = (b[:0xD800 * 2] + b[0xE000 * 2:]).decode("utf-16-le")
    m.VISIBLE_STRING = bytes(range(32, 127)).decode("ascii")
    sys.modules[_ALPHABET_MODULE] = m
    pkg = sys.modules.get("asn1tools.codecs")
    if pkg is not None:
        setattr(pkg, "permitted_alphabet", m)


# --- compile / cache -----------------------------------------------------------------

def _compile(sources: list) -> tuple[dict[str, Any], dict[str, Any]]:
    """(base set, SGP.32 set): every type of the specification, each in the set of the
    file its module comes from (a name is never in both: the flat ``types`` decides)."""
    import asn1tools
    base_files = [str(p) for p in sources[:_BASE_FILES]]
    parsed = asn1tools.parse_files([str(p) for p in sources])
    base_modules = set(asn1tools.parse_files(base_files))
    spec = asn1tools.compile_dict(parsed, "der")
    base_objs = {id(t) for m, types in spec.modules.items() if m in base_modules for t in types.values()}
    base, extra = {}, {}
    for name, t in spec.types.items():
        (base if id(t) in base_objs else extra)[name] = t
    return base, extra


def _unpickle(raw: bytes):
    """pickle.loads, without importing the pickle module (only needed to write the cache)."""
    try:
        from _pickle import loads
    except ImportError:
        from pickle import loads
    return loads(raw)


def _split_checkers(types: dict[str, Any]) -> bytes:
    """Detach the constraints checkers (only needed to encode) into a nested pickle, so
    decoding never imports asn1tools' constraints machinery (~6 ms); each type's checker is a
    pickle of its own inside it (name -> bytes), so an encode unpickles only the checker of the
    type it encodes (attach_checker): `chip info` on the simulated card encodes three types,
    not the ~600 checkers (~6 ms)."""
    import pickle
    checkers = {}
    for name, t in types.items():
        checkers[name] = pickle.dumps(t.constraints_checker, protocol=pickle.HIGHEST_PROTOCOL)
        t.constraints_checker = None
    return pickle.dumps(checkers, protocol=pickle.HIGHEST_PROTOCOL)


def _split_types(types: dict[str, Any]) -> dict[str, bytes]:
    """Each compiled type pickled on its own (checkers detached first), for the cache."""
    import pickle
    return {name: pickle.dumps(t, protocol=pickle.HIGHEST_PROTOCOL) for name, t in types.items()}


def _load_cached(path, which: str) -> tuple[dict, bytes] | None:
    """(the pickled dict, its raw bytes), or None when absent, untrusted or unusable."""
    if not usercache.trusted(path):
        return None
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError:
        return None
    try:
        with _LightAsn1tools():
            obj = _unpickle(raw)
        if (isinstance(obj, dict) and obj.get("format") == _FORMAT and obj.get("set") == which
                and isinstance(obj.get("types"), dict) and isinstance(obj.get("checkers"), bytes)
                and all(isinstance(b, bytes) for b in obj["types"].values())
                and (which != "base" or isinstance(obj.get("extra_names"), list))):
            return obj, raw
    except Exception:  # corrupt or stale pickle: recompile silently
        pass
    return None


def _dump(which: str, types: dict[str, Any], checkers: bytes, extra_names: list | None = None) -> bytes | None:
    import pickle
    try:
        obj = {"format": _FORMAT, "set": which, "types": _split_types(types), "checkers": checkers}
    except (pickle.PicklingError, RecursionError, TypeError, AttributeError):
        return None
    if extra_names is not None:
        obj["extra_names"] = extra_names
    try:
        return pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    except (pickle.PicklingError, RecursionError, TypeError, AttributeError):
        return None


_keys: dict[tuple, str] = {}


def _cache_name(sources: list, which: str) -> str:
    k = tuple(os.fspath(p) for p in sources)
    if k not in _keys:
        _keys[k] = _cache_key(sources)[:32]
    return f"asn1-{_keys[k]}-{which}.pickle"


def _load() -> dict[str, Any]:
    """The base set (loading it if needed); the dict grows when the SGP.32 set loads."""
    if _types is not None:
        return _types
    with _lock:
        return _load_locked()


def warm_codecs() -> None:
    """Import asn1tools' codecs package (datetime, bitstruct, its helpers: ~6 ms), the first
    part of loading the tables (agent/preload.py: each step about as short as a modem's answer,
    since a step that starts as an answer ends delays reading it by the step's length)."""
    with _LightAsn1tools():
        import asn1tools.codecs  # noqa: F401


def warm_modules() -> None:
    """Import asn1tools' BER/DER codec modules (~7 ms after warm_codecs), the second part."""
    _codec_module()


def warm() -> None:
    """Load the base (SGP.22) tables now rather than at the first encode/decode (agent/preload.py)."""
    _load()


def warm_encode() -> None:
    """Also attach the constraints checkers the first encode needs (agent/preload.py: a step of
    its own, so that each step stays about as short as a modem's answer)."""
    _load()
    attach_checkers()


def _load_all() -> dict[str, Any]:
    types = _load()
    if not _extra_loaded:
        with _lock:
            _load_extra_locked()
    return types


def _from_cache(sources: list, which: str) -> dict | None:
    name = _cache_name(sources, which)
    missed = []
    for d in usercache.dirs():
        hit = _load_cached(os.path.join(d, name), which)
        if hit is not None:
            obj, raw = hit
            for m in missed:   # e.g. the user cache became usable again: put it back there
                if usercache.store(os.path.join(m, name), raw, prefix=".codec-"):
                    break
            return obj
        missed.append(d)
    return None


def _compile_and_store(sources: list) -> tuple[dict, dict]:
    """Compile both sets, cache both; returns (base set, SGP.32 set), checkers detached
    (and queued in the pending list by the caller)."""
    base, extra = _compile(sources)
    blobs = {}
    for which, types in (("base", base), ("sgp32", extra)):
        checkers = _split_checkers(types)
        blobs[which] = checkers
        blob = _dump(which, types, checkers, sorted(extra) if which == "base" else None)
        if blob is not None:
            name = _cache_name(sources, which)
            for d in usercache.dirs():
                if usercache.store(os.path.join(d, name), blob, prefix=".codec-"):
                    break
    return {"types": base, "checkers": blobs["base"], "extra_names": sorted(extra)}, \
        {"types": extra, "checkers": blobs["sgp32"]}


def _load_locked() -> dict[str, Any]:
    global _types, _extra_names, _extra_loaded
    if _types is not None:
        return _types
    sources = asn_sources()
    _patch_asn1tools(_codec_module())
    base = _from_cache(sources, "base")
    extra = None
    types: dict[str, Any] = {}
    if base is None:
        base, extra = _compile_and_store(sources)
        types.update(base["types"])             # compiled just now: the objects themselves
    else:
        _type_blobs.update(base["types"])       # from the cache: each unpickled when first asked for
    _pending_checkers.append(base["checkers"])
    _extra_names = frozenset(base["extra_names"])
    if extra is not None:       # compiled just now: both sets are here anyway
        types.update(extra["types"])
        _pending_checkers.append(extra["checkers"])
        _extra_loaded = True
    _types = types
    return types


def _load_extra_locked() -> None:
    global _extra_loaded, _extra_names
    if _extra_loaded:
        return
    sources = asn_sources()
    extra = _from_cache(sources, "sgp32")
    if extra is None or set(extra["types"]) != _extra_names:
        _, extra = _compile_and_store(sources)
        _extra_names = frozenset(extra["types"])
        _types.update(extra["types"])
    else:
        _type_blobs.update(extra["types"])
    _pending_checkers.append(extra["checkers"])
    _extra_loaded = True


def attach_checker(type_name: str) -> None:
    """Attach type ``type_name``'s constraints checker (needed to encode it, or to decode it
    strictly), if it is not attached yet. The type's set must be loaded (compiled() did)."""
    if type_name not in _checker_blobs and not _pending_checkers:
        return
    with _lock:
        _open_pending()
        blob = _checker_blobs.pop(type_name, None)
        if blob is not None:
            _install_permitted_alphabet()
            with _LightAsn1tools():
                _types[type_name].constraints_checker = _unpickle(blob)


def attach_checkers() -> None:
    """Attach the constraints checkers of every type unpickled so far (agent/preload.py: while
    the modem answers, so that no encode of the operation waits for one); a type unpickled
    later gets its own at its first encode (attach_checker)."""
    if not _checker_blobs and not _pending_checkers:
        return
    with _lock:
        _open_pending()
        names = [n for n in _checker_blobs if n in _types]
        if not names:
            return
        _install_permitted_alphabet()
        with _LightAsn1tools():
            for name in names:
                _types[name].constraints_checker = _unpickle(_checker_blobs.pop(name))


def _open_pending() -> None:
    """The loaded sets' checker pickles → one pickle per type (under _lock). Opening the
    outer pickle only makes bytes objects: no asn1tools code is imported or run."""
    while _pending_checkers:
        for name, blob in _unpickle(_pending_checkers[0]).items():
            t = _types.get(name)
            if t is None or t.constraints_checker is None:
                _checker_blobs[name] = blob
        _pending_checkers.pop(0)


def _type(name: str):
    """The compiled type ``name`` of the sets loaded (unpickling it now if needed), or None."""
    t = _types.get(name)
    if t is None and name in _type_blobs:
        with _lock:
            t = _types.get(name)
            if t is None:
                with _LightAsn1tools():
                    t = _types[name] = _unpickle(_type_blobs[name])
                del _type_blobs[name]
    return t


def spec() -> dict[str, Any]:
    """The compiled types (name -> asn1tools compiled type), compiling if needed."""
    types = _load_all()
    for name in list(_type_blobs):
        _type(name)
    return types


def has_type(type_name: str) -> bool:
    return type_name in _load() or type_name in _type_blobs or type_name in _extra_names


def compiled(type_name: str, action: str):
    """The compiled type ``type_name`` (loading its set); KeyError names a type asn1/*.asn lacks."""
    _load()
    t = _type(type_name)
    if t is None and type_name in _extra_names:
        _load_all()
        t = _type(type_name)
    if t is None:
        # a programming error, not bad input: name it plainly
        raise KeyError(f"cannot {action} {type_name!r}: no such type in asn1/*.asn")
    return t
