"""The Bound Profile Package's layout (SGP.22 §2.5.5, docs/protocol.md §1.6, §1.7): its tags, the
BppCommandId and ErrorReason names, and the LPA's cut into ES10 LoadBoundProfilePackage commands.

No cryptography here: the LPA only slices the package it relays, so a download never loads the
crypto the SM-DP+ (``es8p.bind_bpp``) and the eUICC (``es8p.BppReceiver``) need.
"""
from __future__ import annotations

from . import tlv
from .errors import ProtocolError

TAG_BPP = 0xBF36
TAG_ISC = 0xBF23            # InitialiseSecureChannelRequest
TAG_CONFIGURE_ISDP = 0xBF24
TAG_STORE_METADATA = 0xBF25
TAG_REPLACE_SESSION_KEYS = 0xBF26
TAG_OTPK = 0x5F49
TAG_SIG = 0x5F37


# BppCommandId (docs/protocol.md §1.7)
CMD_INITIALISE_SECURE_CHANNEL = 0
CMD_CONFIGURE_ISDP = 1
CMD_STORE_METADATA = 2
CMD_STORE_METADATA2 = 3
CMD_REPLACE_SESSION_KEYS = 4
CMD_LOAD_PROFILE_ELEMENTS = 5
BPP_COMMAND_NAMES = {
    0: "initialiseSecureChannel", 1: "configureISDP", 2: "storeMetadata",
    3: "storeMetadata2", 4: "replaceSessionKeys", 5: "loadProfileElements",
}

# ErrorReason (docs/protocol.md §1.7)
ERR_INCORRECT_INPUT_VALUES = 1
ERR_INVALID_SIGNATURE = 2
ERR_INVALID_TRANSACTION_ID = 3
ERR_UNSUPPORTED_CRT_VALUES = 4
ERR_UNSUPPORTED_REMOTE_OPERATION_TYPE = 5
ERR_UNSUPPORTED_PROFILE_CLASS = 6
ERR_SCP03T_STRUCTURE = 7
ERR_SCP03T_SECURITY = 8
ERR_ICCID_ALREADY_EXISTS = 9
ERR_INSUFFICIENT_MEMORY = 10
ERR_INTERRUPTION = 11
ERR_PE_PROCESSING = 12
ERR_ICCID_MISMATCH = 13
ERR_TEST_PROFILE_INVALID_NAA_KEY = 14
ERR_PPR_NOT_ALLOWED = 15
ERR_UNKNOWN = 127
ERROR_REASON_NAMES = {
    1: "incorrectInputValues", 2: "invalidSignature", 3: "invalidTransactionId",
    4: "unsupportedCrtValues", 5: "unsupportedRemoteOperationType", 6: "unsupportedProfileClass",
    7: "scp03tStructureError", 8: "scp03tSecurityError", 9: "iccidAlreadyExists",
    10: "insufficientMemory", 11: "interruption", 12: "PEProcessingError", 13: "iccidMismatch",
    14: "testProfileInvalidNaaKey", 15: "pprNotAllowed", 127: "unknownError",
}


def _malformed(msg: str) -> ProtocolError:
    return ProtocolError(f"malformed Bound Profile Package: {msg}", code="malformed_bpp")


def split_bpp(bpp: bytes) -> list[bytes]:
    """The LPA's LoadBoundProfilePackage ES10 command sequence (SGP.22 §2.5.5):

    1. BF36 tag+length + the whole BF23;
    2. A0 tag+length + its first 87 (each further 87 its own command);
    3. A1 tag+length only;  4. each 88;
    5. A2 tag+length + its first 87 (if present);
    6. A3 tag+length only;  7. each 86.

    Every command is a slice of ``bpp``: nothing is decoded and re-encoded."""
    bpp = bytes(bpp)
    try:
        tag, length, voff = tlv.read_header(bpp, 0)
    except ProtocolError as e:
        raise _malformed(str(e)) from None
    if tag != TAG_BPP:
        raise _malformed(f"starts with tag {tag:X}, expected BF36")
    if voff + length != len(bpp):
        raise _malformed(f"BF36 says {length} bytes of content, {len(bpp) - voff} present")
    try:
        parts = tlv.parse_all(bpp[voff:])
    except ProtocolError as e:
        raise _malformed(str(e)) from None
    order = [p.tag for p in parts]
    if order not in ([TAG_ISC, 0xA0, 0xA1, 0xA3], [TAG_ISC, 0xA0, 0xA1, 0xA2, 0xA3]):
        raise _malformed("content must be BF23, A0, A1, [A2], A3 in this order; found "
                         + ", ".join(f"{t:X}" for t in order))
    cmds = [bpp[:voff] + parts[0].raw]
    inner_tag = {0xA0: 0x87, 0xA1: 0x88, 0xA2: 0x87, 0xA3: 0x86}
    for p in parts[1:]:
        try:
            items = tlv.children(p)
        except ProtocolError as e:
            raise _malformed(f"inside {p.tag:X}: {e}") from None
        for it in items:
            if it.tag != inner_tag[p.tag]:
                raise _malformed(f"{p.tag:X} holds a {it.tag:X} TLV, expected only {inner_tag[p.tag]:X}")
        header = p.raw[:p.header_len]
        if p.tag in (0xA0, 0xA2):
            if not items:
                raise _malformed(f"{p.tag:X} holds no 87 TLV")
            cmds.append(header + items[0].raw)
            cmds.extend(it.raw for it in items[1:])
        else:
            cmds.append(header)
            cmds.extend(it.raw for it in items)
    return cmds
