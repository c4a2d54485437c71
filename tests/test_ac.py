"""Activation code parsing and reading (SGP.22 §4.1, docs/protocol.md §5)."""
from __future__ import annotations

import io

import pytest

from agent.ac import (ActivationCode, parse_activation_code, read_activation_code, validate_address,
                      validate_matching_id)
from agent.errors import InputError, UsageError


# --- valid forms -----------------------------------------------------------------------

@pytest.mark.parametrize("text,address,token,oid,cc,ci", [
    ("1$smdp.example.com$ABC-123", "smdp.example.com", "ABC-123", None, False, None),
    ("LPA:1$smdp.example.com$ABC-123", "smdp.example.com", "ABC-123", None, False, None),
    ("lpa:1$smdp.example.com$ABC-123", "smdp.example.com", "ABC-123", None, False, None),
    ("Lpa:1$SMDP.Example.COM$ABC", "smdp.example.com", "ABC", None, False, None),        # address lower-cased
    ("1$host$TOK$$1", "host", "TOK", None, True, None),                                   # empty OID placeholder
    ("1$smdp.example.com$", "smdp.example.com", "", None, False, None),                   # empty token allowed
    ("1$smdp.example.com$$", "smdp.example.com", "", None, False, None),
    ("1$smdp.example.com$T$1.3.6.1.4.1.31746$0", "smdp.example.com", "T", "1.3.6.1.4.1.31746", False, None),
    ("1$smdp.example.com$T$2.999.10$1", "smdp.example.com", "T", "2.999.10", True, None),
    ("1$smdp.example.com$T$$$f54172bdf98a95d65cbeb88a38a1c11d800a85c3", "smdp.example.com", "T", None, False,
     "F54172BDF98A95D65CBEB88A38A1C11D800A85C3"),
    ("1$localhost:8443$T", "localhost:8443", "T", None, False, None),                    # test server with port
    ("1$127.0.0.1:8443$T", "127.0.0.1:8443", "T", None, False, None),
    ("1$my-dp.example$T", "my-dp.example", "T", None, False, None),
])
def test_valid(text, address, token, oid, cc, ci):
    ac = parse_activation_code(text)
    assert (ac.address, ac.matching_id, ac.oid, ac.cc_required, ac.ci_pkid) == (address, token, oid, cc, ci)
    assert ac.raw == text
    assert ActivationCode.parse(text) == ac


def test_frozen_and_canonical_string():
    ac = parse_activation_code("LPA:1$Host.Example$TOK$$1")
    with pytest.raises(AttributeError):
        ac.address = "other"          # frozen dataclass
    assert str(ac) == "1$host.example$TOK$$1"
    assert str(parse_activation_code("1$h$T$$")) == "1$h$T"
    assert parse_activation_code(str(ac)).to_json() == ac.to_json()


def test_max_length_is_inclusive():
    token = "T" * (255 - len("1$h$"))
    assert parse_activation_code("1$h$" + token).matching_id == token
    assert parse_activation_code("LPA:1$h$" + token).matching_id == token   # the prefix does not count


# --- each defect has its own code ------------------------------------------------------------

@pytest.mark.parametrize("text,code,fragment", [
    ("", "ac_empty", "empty"),
    ("1$h$" + "T" * 252, "ac_too_long", "256 characters"),
    ("1$smdp.example.com$ABC 123", "ac_bad_characters", "a space"),
    ("1$smdp.example.com$ABC\n", "ac_bad_characters", "line break"),
    (" 1$smdp.example.com$ABC", "ac_bad_characters", "position 1"),
    ("1$smdp.example.com$A\tB", "ac_bad_characters", "tab"),
    ("1$smdp.example.com$A\x00B", "ac_bad_characters", "U+0000"),
    ("1$smdp.example.com$A\u200bB", "ac_bad_characters", "U+200B"),          # zero-width space
    ("https://smdp.example.com", "ac_bad_format", "not an activation code"),
    ("LPA:", "ac_bad_format", "not an activation code"),
    ("$smdp.example.com$T", "ac_bad_format", "not an activation code"),
    ("2$smdp.example.com$T", "ac_unsupported_format", "format '2'"),
    ("01$smdp.example.com$T", "ac_unsupported_format", "only format 1"),
    ("1", "ac_missing_fields", "SM-DP+ address is missing"),
    ("1$smdp.example.com", "ac_missing_fields", "AC_Token (matching ID) is missing"),
    ("1$$TOKEN", "ac_empty_address", "empty"),
    ("1$smdp.example.com$T$1.2$1$AB$extra", "ac_extra_fields", "at most 6"),
    ("1$smdp_example.com$T", "ac_bad_address", "not a hostname"),
    ("1$https://smdp.example.com$T", "ac_bad_address", "bare hostname"),
    ("1$smdp.example.com/path$T", "ac_bad_address", "bare hostname"),
    ("1$user@smdp.example.com$T", "ac_bad_address", "bare hostname"),
    ("1$smdp..example.com$T", "ac_bad_address", "empty label"),
    ("1$smdp.example.com.$T", "ac_bad_address", "empty label"),
    ("1$-smdp.example.com$T", "ac_bad_address", "not a hostname"),
    ("1$smdp.example.com:0$T", "ac_bad_address", "bad port"),
    ("1$smdp.example.com:65536$T", "ac_bad_address", "bad port"),
    ("1$smdp.example.com:https$T", "ac_bad_address", "bad port"),
    ("1$sm\u00e9dp.example.com$T", "ac_bad_address", "not a hostname"),
    ("1$" + "a" * 64 + ".example$T", "ac_bad_address", "64 characters long; a DNS label has at most 63"),
    ("1$smdp.example.com$T$1.3.6.x", "ac_bad_oid", "dotted-decimal"),
    ("1$smdp.example.com$T$1", "ac_bad_oid", "dotted-decimal"),
    ("1$smdp.example.com$T$1.03.6", "ac_bad_oid", "dotted-decimal"),
    ("1$smdp.example.com$T$$2", "ac_bad_cc_flag", "'2'"),
    ("1$smdp.example.com$T$$true", "ac_bad_cc_flag", "1, 0 or empty"),
    ("1$smdp.example.com$T$$$XYZ", "ac_bad_ci_pkid", "hex"),
    ("1$smdp.example.com$T$$$ABC", "ac_bad_ci_pkid", "even number"),
])
def test_defects(text, code, fragment):
    with pytest.raises(InputError) as ei:
        parse_activation_code(text)
    assert ei.value.code == code
    assert fragment in ei.value.message
    assert ei.value.exit_code == 2


def test_validate_address():
    assert validate_address("SMDP.Example.com") == "smdp.example.com"
    assert validate_address("localhost:8443") == "localhost:8443"
    for bad, code in (("", "ac_empty_address"), ("a b", "ac_bad_address"), ("http://x", "ac_bad_address"),
                      ("[::1]:443", "ac_bad_address")):
        with pytest.raises(InputError) as ei:
            validate_address(bad)
        assert ei.value.code == code


# --- reading: argument, file, stdin -------------------------------------------------------------

def test_read_from_argument_strips_whitespace():
    ac = read_activation_code("  LPA:1$smdp.example.com$T\n", None, None)
    assert ac.address == "smdp.example.com" and ac.raw == "LPA:1$smdp.example.com$T"


def test_read_from_file(tmp_path):
    p = tmp_path / "ac.txt"
    p.write_text("\ufeffLPA:1$smdp.example.com$TOKEN$$1\r\n", encoding="utf-8")
    ac = read_activation_code(None, str(p), None)
    assert (ac.address, ac.matching_id, ac.cc_required) == ("smdp.example.com", "TOKEN", True)


def test_read_from_stdin():
    ac = read_activation_code(None, "-", io.StringIO("1$smdp.example.com$TOKEN\n"))
    assert ac.matching_id == "TOKEN"
    with pytest.raises(InputError) as ei:
        read_activation_code(None, "-", None)
    assert ei.value.code == "ac_file_unreadable"


def test_file_errors(tmp_path):
    with pytest.raises(InputError) as ei:
        read_activation_code(None, str(tmp_path / "missing.txt"), None)
    assert ei.value.code == "ac_file_unreadable" and "missing.txt" in ei.value.message
    two = tmp_path / "two.txt"
    two.write_text("1$a$b\n1$c$d\n")
    with pytest.raises(InputError) as ei:
        read_activation_code(None, str(two), None)
    assert ei.value.code == "ac_bad_characters" and "more than one line" in ei.value.message
    binary = tmp_path / "bin"
    binary.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(InputError) as ei:
        read_activation_code(None, str(binary), None)
    assert ei.value.code == "ac_file_unreadable"
    big = tmp_path / "big"
    big.write_text("1$a$" + "x" * 5000)
    with pytest.raises(InputError) as ei:
        read_activation_code(None, str(big), None)
    assert ei.value.code == "ac_too_long"
    bad = tmp_path / "bad"
    bad.write_text("2$a$b\n")
    with pytest.raises(InputError) as ei:
        read_activation_code(None, str(bad), None)
    assert ei.value.code == "ac_unsupported_format" and ei.value.message.startswith(str(bad))
    assert "quote" not in ei.value.message       # no shell hint for files


def test_argument_and_file_are_exclusive_and_one_is_required(tmp_path):
    with pytest.raises(UsageError) as ei:
        read_activation_code("1$a$b", str(tmp_path / "x"), None)
    assert ei.value.code == "ac_twice"
    with pytest.raises(UsageError) as ei:
        read_activation_code(None, None, None)
    assert ei.value.code == "ac_missing"


@pytest.mark.parametrize("mangled", [
    "LPA:1",                 # LPA:1$SMDP$TOKEN, both variables unset
    "1",
    "LPA:1.example.com",     # "LPA:1$smdp.example.com$TOKEN" in double quotes: $smdp and $TOKEN vanish
    "11234561",              # 1$host$tok$$1 unquoted: $$ became the shell's PID
    "1$smdp.example.com",    # ...$TOKEN expanded to nothing
    "1$$TOKEN",              # $SMDP expanded to nothing
])
def test_shell_mangled_argument_gets_a_quoting_hint(mangled):
    with pytest.raises(InputError) as ei:
        read_activation_code(mangled, None, None)
    assert "single quotes" in ei.value.message and "--ac-file" in ei.value.message
    assert ei.value.details["hint"]


def test_no_hint_for_other_defects():
    with pytest.raises(InputError) as ei:
        read_activation_code("1$smdp.example.com$T$$7", None, None)
    assert ei.value.code == "ac_bad_cc_flag"
    assert "quote" not in ei.value.message


# --- issue 9 item 5: matching IDs, label lengths, real lengths, an AC where an address goes ----------

@pytest.mark.parametrize("text,shown", [
    ("1$smdp.example.com$abc-123", "'a' at position 1"),           # lower case
    ("1$smdp.example.com$ABC_123", "'_' at position 4"),
    ("1$smdp.example.com$ABC.123", "'.' at position 4"),
    ("1$smdp.example.com$\u00c4BC", "U+00C4"),
    ("LPA:1$smdp.example.com$A+B$$1", "'+' at position 2"),
])
def test_matching_id_outside_sgp22_character_set(text, shown):
    """SGP.22 §4.1: the matching ID uses only 0-9, A-Z and '-'."""
    with pytest.raises(InputError) as ei:
        parse_activation_code(text)
    assert ei.value.code == "ac_bad_matching_id" and ei.value.exit_code == 2
    assert shown in ei.value.message and "0-9, A-Z and '-'" in ei.value.message


def test_validate_matching_id():
    assert validate_matching_id("ABC-123") == "ABC-123"
    assert validate_matching_id("") == ""
    for bad in ("abc", "A B", "A$B"):
        with pytest.raises(InputError) as ei:
            validate_matching_id(bad)
        assert ei.value.code == "ac_bad_matching_id"


def test_too_long_code_is_reported_with_its_real_length():
    text = "LPA:1$smdp.example.com$" + "A" * 300          # 323 characters, 319 after the prefix
    assert len(text) == 323
    with pytest.raises(InputError) as ei:
        parse_activation_code(text)
    assert ei.value.code == "ac_too_long" and "323 characters" in ei.value.message
    assert "319" not in ei.value.message.split("(")[0]


@pytest.mark.parametrize("text", ["LPA:1$smdp.example.com$ABC", "1$smdp.example.com$ABC", "lpa:1$smdp.example.com$"])
def test_an_activation_code_is_not_an_address(text):
    with pytest.raises(InputError) as ei:
        validate_address(text)
    msg = ei.value.message
    assert ei.value.code == "ac_bad_address" and "activation code" in msg and "smdp.example.com" in msg
    assert "port" not in msg


def test_long_label_and_long_name_say_what_is_too_long():
    with pytest.raises(InputError) as ei:
        validate_address("a" * 64 + ".example.com")
    assert "64 characters long; a DNS label has at most 63" in ei.value.message
    assert validate_address("a" * 63 + ".example.com") == "a" * 63 + ".example.com"
    name = ".".join(["a" * 63] * 4)                                  # 255 characters
    with pytest.raises(InputError) as ei:
        validate_address(name)
    assert "255 characters long; a host name has at most 253" in ei.value.message


def test_ascii_control_characters_found_without_unicodedata():
    """ac._bad_char's ASCII path (no unicodedata import on a CLI download) finds exactly what the
    Unicode category check finds."""
    import unicodedata

    from agent.ac import _bad_char
    for c in map(chr, range(128)):
        s = "LPA:1$a" + c + "b"
        want = next(((i, ch) for i, ch in enumerate(s) if ch.isspace() or unicodedata.category(ch)[0] == "C"), None)
        assert _bad_char(s) == want, repr(c)
    assert _bad_char("LPA:1$smdp.example$ab\u200bc") == (21, "\u200b")     # a format character (Cf)
