"""Error codes are a public contract: one function makes them from spec names,
one table (errors.EXIT_CODES) gives each its exit code, and no code can appear
in the source without being in that table."""
from __future__ import annotations

import ast
import importlib
import pathlib
import pkgutil
import re

import pytest

import agent
from agent import apdu, errors, es8p, es9p, es10
from agent.errors import (EXIT_CODES, SIGNAL_EXIT_CODES, AgentError, CardError, InputError, ProtocolError,
                          TransportError, UsageError, code_for)

AGENT_DIR = pathlib.Path(agent.__file__).parent
SNAKE = re.compile(r"\A[a-z][a-z0-9]*(?:_[a-z0-9]+)*\Z")

# Simulated servers: their error codes go to their HTTP clients (ES9+ subject/reason
# codes, a Twilio-style API), never to our command line.
SERVER_SIDE = {"sim/smdpp.py", "sim/twin.py"}


# --------------------------------------------------------------------------- code_for

@pytest.mark.parametrize("name,code", [
    # the spec names the review asked about
    ("ciPKUnknown", "ci_pk_unknown"),
    ("PEProcessingError", "pe_processing_error"),
    ("iccidOrAidNotFound", "iccid_or_aid_not_found"),
    ("scp03tSecurityError", "scp03t_security_error"),
    ("undefinedError", "undefined_error"),
    # acronyms: a run of capitals is one word; its last capital starts the next word
    ("PPRNotAllowed", "ppr_not_allowed"),
    ("configureISDP", "configure_isdp"),
    ("euiccCiPKIdListForVerification", "euicc_ci_pk_id_list_for_verification"),
    ("HTTPStatus", "http_status"),
    ("OK", "ok"),
    # digits stay with the word before them; a capital after a digit starts a word
    ("scp03tStructureError", "scp03t_structure_error"),
    ("euiccInfo2", "euicc_info2"),
    ("ES10Error", "es10_error"),
    ("unknownResult9", "unknown_result9"),
    # a lower-case letter leading an acronym is part of it
    ("eUICCMemoryReset", "euicc_memory_reset"),
    ("eSIM", "esim"),
    ("eIMConfiguration", "eim_configuration"),
    # separators
    ("Executed-Success", "executed_success"),
    ("  profile  state ", "profile_state"),
    ("already_snake_case", "already_snake_case"),
    ("a__b", "a_b"),
])
def test_code_for(name, code):
    assert code_for(name) == code


def test_code_for_refuses_a_name_without_letters_or_digits():
    with pytest.raises(ValueError):
        code_for("-")


def test_code_for_is_idempotent_on_every_listed_code():
    for code in EXIT_CODES:
        assert code_for(code) == code


# --------------------------------------------------------------------------- the table

def test_table_is_well_formed():
    groups = (errors._REFUSED_CODES, errors._USAGE_CODES, errors._TRANSPORT_CODES)
    listed = [c for g in groups for c in g]
    duplicates = sorted({c for c in listed if listed.count(c) > 1})
    assert not duplicates, f"listed more than once: {duplicates}"
    assert len(EXIT_CODES) == len(listed)
    for code, exit_code in EXIT_CODES.items():
        assert SNAKE.match(code), f"{code!r} is not snake_case"
        assert exit_code in (1, 2, 3), code
    for code, exit_code in SIGNAL_EXIT_CODES.items():
        assert SNAKE.match(code) and code not in EXIT_CODES and exit_code > 128


def test_exit_code_comes_from_the_table():
    # whatever class carries it, a listed code has one exit code
    assert AgentError("x", code="dns_failure").exit_code == 3
    assert AgentError("x", code="no_trusted_ci").exit_code == 2
    assert TransportError("x", code="confirmation_code_required").exit_code == 2
    assert ProtocolError("x", code="smdp_oid_mismatch").exit_code == 1
    # an instance value cannot contradict the table …
    e = AgentError("x", code="read_timeout")
    e.exit_code = 1
    assert e.exit_code == 3
    # … but fills in for a code the table does not know, before the class default
    e = TransportError("x", code="not_in_the_table")
    assert e.exit_code == 3
    e.exit_code = 2
    assert e.exit_code == 2
    # the class default is readable on the class, as before
    assert UsageError.exit_code == 2 and TransportError.exit_code == 3 and AgentError.exit_code == 1
    assert AgentError("interrupted", code="interrupted").exit_code == 130


def test_review_findings():
    """One code, one exit code, whatever the command (field review)."""
    assert EXIT_CODES["smdp_oid_mismatch"] == 1          # we refuse that server; was 3
    assert EXIT_CODES["smdp_address_mismatch"] == 1      # same kind of check; was 3
    assert EXIT_CODES["dns_failure"] == 3                # also through `notification process` (was 1 there)
    assert EXIT_CODES["no_trusted_ci"] == 2              # also through `notification process` (was 1 there)
    assert EXIT_CODES["confirmation_code_required"] == 2  # also when the SM-DP+ says so (8.2.7/2.2; was 1)


def test_download_error_takes_its_exit_code_from_the_table():
    from agent.flows.download import DownloadError
    assert DownloadError("x", ProtocolError("bad", code="smdp_oid_mismatch")).exit_code == 1
    assert DownloadError("x", InputError("cc", code="confirmation_code_required"),
                         code="confirmation_code_required").exit_code == 2
    assert DownloadError("x", "plain text").code == "download_failed"
    # a code missing from the table: the cause's exit code, as before
    assert DownloadError("x", TransportError("odd", code="not_in_the_table")).exit_code == 3


# --------------------------------------------------------------------------- generated codes

def test_es10_results_are_listed():
    for table in es10.RESULT_TABLES:
        for value, name in table.items():
            if name == "ok":
                continue
            e = es10.Es10Error("Fn", name, value)
            assert e.code == code_for(name) and EXIT_CODES[e.code] == 1, name
    for odd in ("unknownResult9", "error5"):
        assert es10.Es10Error("Fn", odd, 9).code == "unknown_result"
    assert EXIT_CODES["unknown_result"] == 1


def test_bpp_error_reasons_are_listed():
    for reason, name in es8p.ERROR_REASON_NAMES.items():
        e = es8p.BppError(es8p.CMD_CONFIGURE_ISDP, reason, "x")
        assert e.code == "bpp_" + code_for(name) and EXIT_CODES[e.code] == 1
        assert EXIT_CODES["install_" + code_for(name)] == 1          # flows/download.py
    assert es8p.BppError(1, 99, "x").code == "bpp_unknown_error"
    assert es8p.BppSequenceError(1, "x").code == "bpp_sequence"


def test_es9p_status_codes_are_listed():
    for (subject, reason), (code, _) in es9p.STATUS_CODES.items():
        assert code in EXIT_CODES, (subject, reason, code)
        e = es9p._status_error("fn", "Failed", {"subjectCode": subject, "reasonCode": reason})
        assert e.code == code and e.exit_code == EXIT_CODES[code]
    assert es9p._status_error("fn", "Expired", {}).code == "smdp_expired"


def test_status_word_codes_are_listed():
    codes = {apdu.sw_error(sw, "x").code for sw in range(0x6000, 0x7000)}
    assert codes <= set(EXIT_CODES), codes - set(EXIT_CODES)
    assert {EXIT_CODES[c] for c in codes} == {1}


def test_cancel_reasons_agree_with_the_table():
    cancel = pytest.importorskip("agent.cancel")
    for reason, (code, exit_code, _) in cancel.REASONS.items():
        assert errors.exit_code_for(code) == exit_code, reason
        assert cancel.Cancelled(reason).exit_code == exit_code


# --------------------------------------------------------------------------- the source

def _strings(node) -> list[str]:
    """String constants an expression can evaluate to (a, x if c else b, d.get(k, a))."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [node.value]
    if isinstance(node, ast.IfExp):
        return _strings(node.body) + _strings(node.orelse)
    if isinstance(node, ast.BoolOp):
        return [s for v in node.values for s in _strings(v)]
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get"
            and len(node.args) == 2):
        return _strings(node.args[1])
    return []


# Calls that take the code (or the reason a code is made of) as a positional argument.
POSITIONAL = {
    "_fail": (0, lambda s: s),                      # ac.py
    "HttpError": (1, lambda s: s),                  # daemon/server.py
    "CertError": (0, lambda s: "cert_" + s),        # crypto.py
    "BspError": (0, lambda s: "bsp_" + s),          # bsp.py
    "Es10Error": (1, es10.outcome_code),
}


def _codes_in(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            for kw in node.keywords:
                if kw.arg == "code":
                    for s in _strings(kw.value):
                        yield node.lineno, s
            fn = node.func.id if isinstance(node.func, ast.Name) else getattr(node.func, "attr", None)
            if fn in POSITIONAL:
                i, make = POSITIONAL[fn]
                if len(node.args) > i:
                    for s in _strings(node.args[i]):
                        yield node.lineno, make(s)
        elif isinstance(node, ast.Assign):
            for t in node.targets:
                if (isinstance(t, ast.Name) and t.id == "code") or (isinstance(t, ast.Attribute) and t.attr == "code"):
                    for s in _strings(node.value):
                        yield node.lineno, s
        elif isinstance(node, ast.Dict):
            for k, v in zip(node.keys, node.values):
                if isinstance(k, ast.Constant) and k.value == "code":
                    for s in _strings(v):
                        yield node.lineno, s


def _source_codes() -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for path in sorted(AGENT_DIR.rglob("*.py")):
        rel = path.relative_to(AGENT_DIR).as_posix()
        if rel in SERVER_SIDE:
            continue
        for line, code in _codes_in(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            found.setdefault(code, []).append(f"agent/{rel}:{line}")
    return found


def test_every_code_in_the_source_is_in_the_table():
    found = _source_codes()
    assert len(found) > 100          # the scan does find the codes
    missing = {c: where for c, where in found.items() if errors.exit_code_for(c) is None}
    assert not missing, ("error codes without an exit code: add each to errors.EXIT_CODES "
                         f"(1 refused, 2 usage/input, 3 transport): {missing}")


def test_every_listed_code_is_produced_somewhere():
    """No stale entries: each listed code is in the source or made from a spec table."""
    made = set(_source_codes())
    made |= {es10.outcome_code(n) for t in es10.RESULT_TABLES for n in t.values() if n != "ok"}
    made.add(es10.outcome_code("unknownResult9"))
    for name in es8p.ERROR_REASON_NAMES.values():
        made |= {"bpp_" + code_for(name), "install_" + code_for(name)}
    made |= {code for code, _ in es9p.STATUS_CODES.values()}
    made |= {apdu.sw_error(sw, "x").code for sw in range(0x6000, 0x7000)}
    cancel = pytest.importorskip("agent.cancel")
    made |= {code for code, _, _ in cancel.REASONS.values()}
    assert not set(EXIT_CODES) - made, f"listed but never produced: {sorted(set(EXIT_CODES) - made)}"


def test_every_error_class_default_agrees_with_the_table():
    """A class's own exit code and the table's entry for its class code are the same."""
    for info in pkgutil.walk_packages(agent.__path__, "agent."):
        if info.name.endswith("__main__"):
            continue
        importlib.import_module(info.name)
    todo, seen = [AgentError], []
    while todo:
        cls = todo.pop()
        seen.append(cls)
        todo.extend(cls.__subclasses__())
    for cls in seen:
        if not cls.__module__.startswith("agent."):
            continue
        listed = errors.exit_code_for(cls.code)
        assert listed is not None, f"{cls.__module__}.{cls.__name__}.code {cls.code!r} is not in EXIT_CODES"
        assert listed == cls.default_exit_code, (
            f"{cls.__module__}.{cls.__name__}: class exit code {cls.default_exit_code}, "
            f"EXIT_CODES[{cls.code!r}] = {listed}")
    assert CardError in seen
