"""How agent/codec.py loads its compiled tables: the SGP.32 set only when first asked for, the same
answers either way, the fast stand-in for asn1tools' permitted-alphabet module."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

from agent import codec

REPO = Path(__file__).resolve().parent.parent


def _run(code: str, tmp_path: Path) -> subprocess.CompletedProcess:
    own_tmp = tmp_path / "tmpdir"
    own_tmp.mkdir(exist_ok=True)
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path / "cache"), PYTHONPATH=str(REPO), TMPDIR=str(own_tmp))
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, cwd=str(REPO),
                          capture_output=True, text=True, timeout=120)


def test_sets_partition_the_whole_specification():
    types = codec.spec()
    assert codec._extra_loaded
    extra = codec._extra_names
    assert extra and extra <= set(types)
    assert "GetEuiccDataResponse" in types and "GetEuiccDataResponse" not in extra        # SGP.22: base set
    assert "EsipaMessageFromEimToIpa" in extra                                           # SGP.32 set


def test_sgp32_set_loads_on_first_use_and_answers_alike(tmp_path):
    code = """
        import sys
        from agent import codec
        eid = bytes.fromhex('BF3E125A10' + '89049032123451234512345678901235')
        assert codec.decode('GetEuiccDataResponse', eid)['eidValue'].hex().startswith('8904')
        assert not codec._extra_loaded
        assert codec.has_type('EsipaMessageFromEimToIpa') and codec.has_type('GetEuiccDataResponse')
        assert not codec.has_type('NoSuchType') and not codec._extra_loaded
        assert codec.encode('GetEuiccDataRequest', {'tagList': b'Z'}) == bytes.fromhex('BF3E035C015A')
        v = codec.decode('EsipaMessageFromEimToIpa', bytes.fromhex('BF4F03020101'))
        assert v == ('getEimPackageResponse', ('eimPackageError', 1)), v
        assert codec._extra_loaded
        assert codec.encode('EsipaMessageFromEimToIpa', v) == bytes.fromhex('BF4F03020101')
        try:
            codec.encode('NoSuchType', {})
        except KeyError as e:
            assert 'no such type' in str(e)
        else:
            raise AssertionError('KeyError expected')
        print(len(codec.spec()))
    """
    cold = _run("from agent import codec; print(len(codec.spec()))", tmp_path)    # compiles both sets
    assert cold.returncode == 0, cold.stderr
    warm = _run(code, tmp_path)
    assert warm.returncode == 0, warm.stderr
    assert cold.stdout == warm.stdout and int(warm.stdout) == len(codec.spec())


def test_a_broken_sgp32_pickle_is_recompiled(tmp_path):
    code = """
        from agent import codec
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
        from agent import codec
        codec._install_permitted_alphabet()
        m = sys.modules['asn1tools.codecs.permitted_alphabet']
        assert m.__doc__ == 'Permitted alphabet.', 'the stand-in is not installed'
        for n in ('NUMERIC_STRING', 'PRINTABLE_STRING', 'IA5_STRING', 'BMP_STRING', 'VISIBLE_STRING'):
            print(n, hashlib.sha256(getattr(m, n).encode('utf-8', 'surrogatepass')).hexdigest())
    """)], capture_output=True, text=True, timeout=60, cwd=str(REPO), env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert mine.returncode == 0, mine.stderr
    assert mine.stdout == real.stdout
