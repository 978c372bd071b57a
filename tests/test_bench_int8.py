"""bench/int8.py says which low-precision arithmetic the measuring CPU has, from its flags (the project's machines
differ: AVX512-BF16 and VNNI without AMX on one, AMX on another)."""

from __future__ import annotations


def test_the_int8_section_names_the_cpus_arithmetic_from_its_flags(bench):
    int8 = bench("int8")

    assert int8._arithmetic(["avx2", "avx512_bf16", "avx512_vnni"]) == "AVX512-BF16 and AVX512-VNNI, no AMX"
    amx = int8._arithmetic(["amx_bf16", "amx_int8", "amx_tile", "avx512_bf16", "avx512_vnni"])
    assert amx == "AVX512-BF16, AVX512-VNNI, AMX-BF16 and AMX-INT8"
    assert int8._arithmetic(["avx2"]) == "none of AVX512-BF16, AVX512-VNNI or AMX"


def test_a_missing_real_data_package_is_refused_before_the_minutes_of_speed_measurements(
    bench, monkeypatch, tmp_path, capsys
):
    int8 = bench("int8")
    import pytest

    monkeypatch.setattr(int8, "measure_speed", lambda *a: pytest.fail("measured before checking --real"))
    with pytest.raises(SystemExit) as info:
        int8.main(["--real", str(tmp_path / "nothing"), "--no-write"])
    assert info.value.code == 2 and "no model package there" in capsys.readouterr().err
