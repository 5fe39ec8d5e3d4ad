"""Configuration objects: validation, readable reprs, dict/JSON round trips."""

import json

import pytest

import tfaccum
from tfaccum import AccumConfig, AccumPolicy, FloatFormat


def test_reprs_are_readable():
    cfg = AccumConfig(accumulator=FloatFormat(6, 9), chunk_size=64)
    assert repr(cfg) == "AccumConfig(e6m9, exact products, chunk 64, nearest-even)"
    cfg = AccumConfig(accumulator=FloatFormat(5, 7, subnormals=False), product=tfaccum.FP8_E5M2,
                      rounding="stochastic", seed=3)
    assert repr(cfg) == ("AccumConfig(e5m7 (no subnormals), products e5m2, sequential, "
                         "stochastic, seed 3)")
    assert "operands=e5m2" in repr(AccumPolicy(operands=tfaccum.FP8_E5M2))


def test_the_three_float32_names_are_a_format_a_config_and_a_policy():
    assert isinstance(tfaccum.BINARY32, FloatFormat)
    assert tfaccum.FLOAT32_CONFIG == AccumConfig(accumulator=tfaccum.BINARY32)
    assert tfaccum.FLOAT32_CONFIG.is_exact_float32
    assert tfaccum.FLOAT32_POLICY == AccumPolicy.uniform(tfaccum.FLOAT32_CONFIG)
    # The earlier names stay, as the very same objects.
    assert tfaccum.FLOAT32 is tfaccum.FLOAT32_CONFIG
    assert tfaccum.FULL_PRECISION is tfaccum.FLOAT32_POLICY


def test_presets():
    assert (tfaccum.BINARY32.exponent_bits, tfaccum.BINARY32.mantissa_bits) == (8, 23)
    assert (tfaccum.BINARY16.exponent_bits, tfaccum.BINARY16.mantissa_bits) == (5, 10)
    assert (tfaccum.BFLOAT16.exponent_bits, tfaccum.BFLOAT16.mantissa_bits) == (8, 7)
    assert (tfaccum.FP8_E5M2.exponent_bits, tfaccum.FP8_E5M2.mantissa_bits) == (5, 2)
    assert (tfaccum.FP8_E4M3.exponent_bits, tfaccum.FP8_E4M3.mantissa_bits) == (4, 3)
    assert tfaccum.BINARY16.max_value == 65504.0
    assert tfaccum.FP8_E4M3.max_value == 240.0
    assert tfaccum.as_format("e6m9") == FloatFormat(6, 9)
    assert tfaccum.as_format("bfloat16") is tfaccum.BFLOAT16


def test_round_trips():
    policy = AccumPolicy(
        fwd=AccumConfig(accumulator=FloatFormat(6, 9), chunk_size=64),
        bwd=AccumConfig(accumulator=FloatFormat(6, 7, overflow="inf"), product=FloatFormat(5, 2),
                        rounding="toward_zero"),
        grad=AccumConfig(accumulator=FloatFormat(6, 12), chunk_size=32,
                         chunk_accumulator=FloatFormat(8, 16), rounding="stochastic", seed=-5),
        operands=tfaccum.FP8_E5M2)
    assert AccumPolicy.from_dict(policy.to_dict()) == policy
    assert AccumPolicy.from_json(policy.to_json()) == policy
    assert AccumPolicy.from_dict(json.loads(json.dumps(policy.to_dict()))) == policy
    assert AccumConfig.from_dict(policy.grad.to_dict()) == policy.grad
    assert FloatFormat.from_dict(policy.operands.to_dict()) == policy.operands


def test_immutable():
    cfg = AccumConfig()
    with pytest.raises(Exception):
        cfg.chunk_size = 3
    assert cfg.replace(chunk_size=3).chunk_size == 3 and cfg.chunk_size == 0


@pytest.mark.parametrize("kwargs,match", [
    (dict(exponent_bits=1, mantissa_bits=3), "exponent_bits must be in 2..8"),
    (dict(exponent_bits=9, mantissa_bits=3), "exponent_bits must be in 2..8"),
    (dict(exponent_bits=5, mantissa_bits=24), "mantissa_bits must be in 0..23"),
    (dict(exponent_bits=5, mantissa_bits=-1), "mantissa_bits must be in 0..23"),
    (dict(exponent_bits=5, mantissa_bits=2, overflow="wrap"), "overflow must be one of"),
])
def test_format_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        FloatFormat(**kwargs)


def test_config_validation():
    with pytest.raises(ValueError, match="chunk_size must be in 0"):
        AccumConfig(chunk_size=-1)
    with pytest.raises(ValueError, match="rounding must be one of"):
        AccumConfig(rounding="up")
    with pytest.raises(TypeError, match="chunk_size must be an int"):
        AccumConfig(chunk_size=2.5)
    with pytest.raises(TypeError, match="subnormals must be a bool"):
        FloatFormat(5, 2, subnormals="yes")
    with pytest.raises(ValueError, match="unknown format"):
        AccumConfig(accumulator="e6")
    with pytest.raises(TypeError, match="must be an AccumConfig"):
        AccumPolicy(fwd=FloatFormat(5, 2))
    with pytest.raises(ValueError, match="unknown AccumConfig fields"):
        AccumConfig.from_dict({"accumulator": {"exponent_bits": 5, "mantissa_bits": 2}, "chunk": 3})
    with pytest.raises(TypeError, match="AccumConfig or tfaccum.AccumPolicy"):
        tfaccum.as_policy("fp32")


def test_numpy_integers_are_accepted_and_stored_as_python_ints():
    import numpy as np

    cfg = AccumConfig(accumulator=FloatFormat(np.int64(6), np.int32(9), subnormals=np.bool_(True)),
                      chunk_size=np.uint16(64), rounding="stochastic", seed=np.int64(-5))
    assert cfg == AccumConfig(accumulator=FloatFormat(6, 9), chunk_size=64,
                              rounding="stochastic", seed=-5)
    assert type(cfg.seed) is int and type(cfg.chunk_size) is int
    assert type(cfg.accumulator.mantissa_bits) is int and type(cfg.accumulator.subnormals) is bool
    assert AccumConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(TypeError, match="seed must be an int, got float64"):
        AccumConfig(seed=np.float64(3))
    with pytest.raises(TypeError, match="seed must be an int, got bool"):
        AccumConfig(seed=np.bool_(True))
    with pytest.raises(ValueError, match=r"seed must be in -9223372036854775808\.\.9223372036854775807, "
                                         r"got 9223372036854775808"):
        AccumConfig(seed=np.uint64(2 ** 63))


# --- the fused adder (numerics.md section 7) ---------------------------------------------
def test_fused_adder_validates_and_round_trips():
    from tfaccum.config import FusedAdder

    adder = FusedAdder(terms=32, fraction_bits=13, zero_exponent=-133, operand_emin=-6,
                       hardware="hopper e4m3")
    config = AccumConfig(accumulator=FloatFormat(8, 13, overflow="inf"), fused=adder,
                         chunk_size=128, chunk_accumulator=tfaccum.BINARY32)
    assert AccumConfig.from_dict(config.to_dict()) == config
    assert AccumConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    assert config.kernel_attrs()["fused"] == [32, 13, -133, -6, 1]
    assert "fused" not in AccumConfig().kernel_attrs()  # graphs without it still load
    assert not config.is_exact_float32
    assert "hopper e4m3" in repr(config) and "32-term" in repr(config)
    for bad in [dict(terms=0), dict(terms=65), dict(fraction_bits=0), dict(fraction_bits=41),
                dict(zero_exponent=513), dict(operand_emin=1), dict(operand_emin=-150)]:
        with pytest.raises(ValueError):
            FusedAdder(**{**dict(terms=4, fraction_bits=23, zero_exponent=-131), **bad})
    with pytest.raises(ValueError, match="output_rounding"):
        FusedAdder(4, 23, -131, output_rounding="stochastic")
    with pytest.raises(TypeError):
        FusedAdder(4.0, 23, -131)
    with pytest.raises(ValueError, match="exact products"):
        AccumConfig(fused=adder, product=FloatFormat(5, 2))
    with pytest.raises(TypeError, match="FusedAdder"):
        AccumConfig(fused=(4, 23))
