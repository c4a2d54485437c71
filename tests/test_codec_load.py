"""How agent/asn1tables.py loads the compiled tables: the SGP.32 set only when first asked for, the same
answers either way, the fast stand-in for asn1tools' permitted-alphabet module."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

from agent import asn1tables

REPO = Path(__file__).resolve().parent.parent


def _run(code: str, tmp_path: Path) -> subprocess.CompletedProcess:
    own_tmp = tmp_path / "tmpdir"
    own_tmp.mkdir(exist_ok=True)
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path / "cache"), PYTHONPATH=str(REPO), TMPDIR=str(own_tmp))
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, cwd=str(REPO),
                          capture_output=True, text=True, timeout=120)


def test_sets_partition_the_whole_specification():
    types = asn1tables.spec()
    assert asn1tables._extra_loaded
    extra = asn1tables._extra_names
    assert extra and extra <= set(types)
    assert "GetEuiccDataResponse" in types and "GetEuiccDataResponse" not in extra        # SGP.22: base set
    assert "EsipaMessageFromEimToIpa" in extra                                           # SGP.32 set


def test_sgp32_set_loads_on_first_use_and_answers_alike(tmp_path):
    code = """
        import sys
        from agent import asn1tables, codec
        eid = bytes.fromhex('BF3E125A10' + '89049032123451234512345678901235')
        assert codec.decode('GetEuiccDataResponse', eid)['eidValue'].hex().startswith('8904')
        assert not asn1tables._extra_loaded
        assert asn1tables.has_type('EsipaMessageFromEimToIpa') and asn1tables.has_type('GetEuiccDataResponse')
        assert not asn1tables.has_type('NoSuchType') and not asn1tables._extra_loaded
        assert codec.encode('GetEuiccDataRequest', {'tagList': b'Z'}) == bytes.fromhex('BF3E035C015A')
        v = codec.decode('EsipaMessageFromEimToIpa', bytes.fromhex('BF4F03020101'))
        assert v == ('getEimPackageResponse', ('eimPackageError', 1)), v
        assert asn1tables._extra_loaded
        assert codec.encode('EsipaMessageFromEimToIpa', v) == bytes.fromhex('BF4F03020101')
        try:
            codec.encode('NoSuchType', {})
        except KeyError as e:
            assert 'no such type' in str(e)
        else:
            raise AssertionError('KeyError expected')
        print(len(asn1tables.spec()))
    """
    cold = _run("from agent import asn1tables; print(len(asn1tables.spec()))", tmp_path)    # compiles both sets
    assert cold.returncode == 0, cold.stderr
    warm = _run(code, tmp_path)
    assert warm.returncode == 0, warm.stderr
    assert cold.stdout == warm.stdout and int(warm.stdout) == len(asn1tables.spec())


def test_a_broken_sgp32_pickle_is_recompiled(tmp_path):
    code = """
        from agent import asn1tables, codec
        print(codec.decode('EsipaMessageFromEimToIpa', bytes.fromhex('BF4F03020101')))
    """
    assert _run(code, tmp_path).returncode == 0
    (p,) = (tmp_path / "cache" / "esim-agent").glob("asn1-*-sgp32.pickle")
    p.write_bytes(b"\x80\x05garbage")
    r = _run(code, tmp_path)
    assert r.returncode == 0 and r.stderr == "", r.stderr
    assert len(p.read_bytes()) > 10000


def test_permitted_alphabet_stand_in_equals_the_real_module():
    real = subprocess.run([sys.executable, "-c", textwrap.dedent("""
        import hashlib, asn1tools.codecs.permitted_alphabet as m
        for n in ('NUMERIC_STRING', 'PRINTABLE_STRING', 'IA5_STRING', 'BMP_STRING', 'VISIBLE_STRING'):
            print(n, hashlib.sha256(getattr(m, n).encode('utf-8', 'surrogatepass')).hexdigest())
    """)], capture_output=True, text=True, timeout=60)
    assert real.returncode == 0, real.stderr
    mine = subprocess.run([sys.executable, "-c", textwrap.dedent("""
        import hashlib, sys
        from agent import asn1tables, codec
        asn1tables._install_permitted_alphabet()
        m = sys.modules['asn1tools.codecs.permitted_alphabet']
        assert m.__doc__ == 'Permitted alphabet.', 'the stand-in is not installed'
        for n in ('NUMERIC_STRING', 'PRINTABLE_STRING', 'IA5_STRING', 'BMP_STRING', 'VISIBLE_STRING'):
            print(n, hashlib.sha256(getattr(m, n).encode('utf-8', 'surrogatepass')).hexdigest())
    """)], capture_output=True, text=True, timeout=60, cwd=str(REPO), env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert mine.returncode == 0, mine.stderr
    assert mine.stdout == real.stdout


def _strptime_reading(s: str):
    import datetime
    try:
        if len(s) != 13 or s[-1] != "Z":
            raise ValueError
        return datetime.datetime.strptime(s[:-1], "%y%m%d%H%M%S")
    except ValueError:
        return "error"


def test_utc_time_reads_as_asn1tools_strptime_did_without_strptime():
    """asn1tables._patch_der reads DER UTCTime without datetime.strptime (whose first use costs a
    download ~5 ms): same datetimes as asn1tools' own reading, same refusals, and no _strptime."""
    import datetime

    from hypothesis import given, settings
    from hypothesis import strategies as st
    asn1tables.warm()
    from asn1tools.codecs import der
    ours = der.restricted_utc_time_to_datetime

    def read(s):
        try:
            return ours(s)
        except Exception as e:
            assert type(e).__name__ == "DecodeError", e
            return "error"

    for s in ("261129193030Z", "500101000000Z", "491231235959Z", "680101000000Z", "690101000000Z",
              "991231235959Z", "000229000000Z", "010229000000Z", "261329000000Z", "261100000000Z",
              "261129246000Z", "261129235960Z", "26112919303Z", "2611291930300Z", "261129193030",
              "261129193030+", "2611291930 0Z", "-61129193030Z"):
        assert read(s) == _strptime_reading(s), s
    # The contents reach it decoded as ASCII (der.UTCTime), so strptime's Unicode digits never
    # could; refusing them is stricter, not different.
    assert read("２61129193030Z") == "error"

    @settings(max_examples=300, deadline=None)
    @given(st.datetimes(min_value=datetime.datetime(1969, 1, 1), max_value=datetime.datetime(2068, 12, 31)))
    def same_datetime(d):
        s = d.strftime("%y%m%d%H%M%S") + "Z"
        assert read(s) == _strptime_reading(s) == d.replace(microsecond=0)

    same_datetime()

    gen = der.restricted_generalized_time_to_datetime

    def read_gen(s):
        try:
            return gen(s)
        except Exception as e:          # ours, or asn1tools' own for the forms it still reads
            assert type(e).__name__ in ("DecodeError", "Error"), e
            return "error"

    def strptime_gen(s):
        try:
            if len(s) != 15 or s[-1] != "Z":
                raise ValueError
            return datetime.datetime.strptime(s[:-1], "%Y%m%d%H%M%S")
        except ValueError:
            return "error"

    for s in ("99991231235959Z", "20261129193030Z", "20500101000000Z", "00000101000000Z", "09990101000000Z",
              "20261329000000Z", "20260229000000Z", "20240229000000Z", "20261129246000Z", "2026112919303Z",
              "20261129193030", "2026112919 030Z"):
        assert read_gen(s) == strptime_gen(s), s
    assert read_gen("20261129193030.5Z") == datetime.datetime(2026, 11, 29, 19, 30, 30, 500000)  # asn1tools'

    @settings(max_examples=300, deadline=None)
    @given(st.datetimes(min_value=datetime.datetime(1000, 1, 1)))
    def same_generalized(d):
        s = d.strftime("%Y%m%d%H%M%S") + "Z"
        assert read_gen(s) == strptime_gen(s) == d.replace(microsecond=0)

    same_generalized()
    r = subprocess.run([sys.executable, "-c", "import sys\nfrom agent import asn1tables\nasn1tables.warm()\n"
                        "from asn1tools.codecs import der\n"
                        "der.restricted_utc_time_to_datetime('261129193030Z')\n"
                        "der.restricted_generalized_time_to_datetime('99991231235959Z')\n"
                        "print('_strptime' in sys.modules)"], capture_output=True, text=True, timeout=60)
    assert r.stdout.strip() == "False", r.stderr


def test_an_encode_attaches_only_its_types_checker_and_still_checks(tmp_path):
    """Each type's constraints checker is its own pickle: encoding GetEuiccDataResponse unpickles
    its checker alone, and that checker still refuses a value out of its constraints; a strict
    decode attaches its type's; attach_checkers() (a preload step) attaches every one, cold
    (just compiled) or warm (from the cache) alike."""
    code = """
        from agent import asn1tables, codec
        t = asn1tables.compiled('GetEuiccDataResponse', 'encode')
        others = [n for n in ('EUICCInfo2', 'ProfileInfoListResponse', 'EsipaMessageFromEimToIpa')]
        assert t.constraints_checker is None
        assert codec.encode('GetEuiccDataResponse', {'eidValue': bytes(16)}).hex() == 'bf3e125a10' + '00' * 16
        assert t.constraints_checker is not None
        assert all(asn1tables.compiled(n, 'decode').constraints_checker is None for n in others)
        try:
            codec.encode('GetEuiccDataResponse', {'eidValue': bytes(15)})     # EID is SIZE(16)
        except ValueError as e:
            assert 'GetEuiccDataResponse' in str(e)
        else:
            raise AssertionError('a 15-byte EID was encoded')
        short = bytes.fromhex('E30B5A09' + '98' * 9)                          # ICCID is SIZE(10)
        assert codec.decode('ProfileInfo', short)['iccid'] == b'\\x98' * 9        # lenient: fine
        try:
            codec.decode('ProfileInfo', short, check_constraints=True)
        except Exception as e:
            assert getattr(e, 'code', None) == 'malformed_asn1', e
        else:
            raise AssertionError('a 9-byte ICCID passed a strict decode')
        assert asn1tables.compiled('ProfileInfo', 'decode').constraints_checker is not None
        asn1tables.attach_checkers()
        missing = [n for n, t in asn1tables._load().items() if t.constraints_checker is None]
        assert not missing, missing[:5]
        print('ok')
    """
    for run in ("cold", "warm"):
        r = _run(code, tmp_path)
        assert r.returncode == 0 and r.stdout.strip() == "ok", (run, r.stderr)


def test_types_are_unpickled_when_first_asked_for(tmp_path):
    """From the cache, each type is its own pickle: decoding GetEuiccDataResponse unpickles that
    type and no other; has_type knows the others without unpickling them; spec() unpickles every
    one, and a type read alone answers as the same type read with all the others."""
    code = """
        from agent import asn1tables, codec
        eid = bytes.fromhex('BF3E125A10' + '89049032123451234512345678901235')
        assert asn1tables._types is None
        assert codec.decode('GetEuiccDataResponse', eid)['eidValue'] == eid[5:]
        assert set(asn1tables._types) == {'GetEuiccDataResponse'}, sorted(asn1tables._types)
        assert len(asn1tables._type_blobs) > 100
        assert asn1tables.has_type('ProfileInfoListResponse') and 'ProfileInfoListResponse' not in asn1tables._types
        req = codec.encode('GetEuiccDataRequest', {'tagList': b'Z'})
        assert set(asn1tables._types) == {'GetEuiccDataResponse', 'GetEuiccDataRequest'}
        everything = asn1tables.spec()
        assert not asn1tables._type_blobs and len(everything) > 300
        assert codec.encode('GetEuiccDataRequest', {'tagList': b'Z'}) == req == bytes.fromhex('BF3E035C015A')
        assert codec.decode('GetEuiccDataResponse', eid)['eidValue'] == eid[5:]
        print('ok')
    """
    r = _run("from agent import asn1tables; asn1tables.spec()", tmp_path)        # compile, fill the cache
    assert r.returncode == 0, r.stderr
    r = _run(code, tmp_path)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr
