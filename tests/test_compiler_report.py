"""The compiler report (jaxlora/bench/compiler_report.py): our kernels' Triton IR compiled by the
``triton`` package for sm_90 on this machine, read back from the SASS. It pins down what the
Triton compiler makes of lora_matmul's K loop, which a CPU timing cannot show."""

from __future__ import annotations

import pytest

from jaxlora.bench.compiler_report import k_loop, projection_report, sgmv_report
from jaxlora.errors import ConfigError


def _one(reports, prefix):
    [kernel] = [r for r in reports if r.name.startswith(prefix)]
    return kernel


def test_in_loop_shrink_keeps_the_base_dot_split_along_n():
    """At T = 32 the base dot is a warp MMA (HMMA) with the 4 warps side by side along N, 32
    HMMA a K step and warp; the in-loop shrink (32 rank rows) adds its 16 and keeps that split
    (with the shrink dot second, Triton split the warps along M and ran every row tile's base
    dot twice: 96). Every load of the K loop is an asynchronous copy: 12 (x and W tiles) and 4
    more for the A tile."""
    base = _one(projection_report("qkv", 32, lora="none"), "lora_matmul_bm32")
    shrink = _one(projection_report("qkv", 32, lora="shrink"), "lora_matmul_shrink32_bm32")
    assert base.mma == ("v2 warps [1, 4]",)
    assert set(shrink.mma) == {"v2 warps [1, 4]"}
    assert base.loop_counts["HMMA"] == 32 and shrink.loop_counts["HMMA"] == 48
    assert base.loop_counts["LDGSTS"] == 12 and shrink.loop_counts["LDGSTS"] == 16
    assert base.loop_counts["LDG"] == shrink.loop_counts["LDG"] == 0
    assert shrink.shared_bytes > base.shared_bytes


def test_a_128_token_block_runs_hopper_warpgroup_mmas():
    """From 64 tokens a block the base dot is Hopper's warpgroup MMA (HGMMA), below it the warp
    MMA: the expand kernel at T = 128 against T = 32."""
    wide = _one(projection_report("o", 128, lora="expand"), "lora_matmul_expand")
    narrow = _one(projection_report("o", 32, lora="expand"), "lora_matmul_expand")
    assert wide.kernel_counts["HGMMA"] > 0 and wide.kernel_counts["HMMA"] == 0
    assert narrow.kernel_counts["HMMA"] > 0 and narrow.kernel_counts["HGMMA"] == 0
    assert all(m.startswith("v3") for m in wide.mma)


def test_min_block_m_64_gives_a_small_step_warpgroup_mmas():
    """MatmulConfig.min_block_m=64: the T = 32 base kernel in blocks of 64 rows runs Hopper's
    warpgroup MMAs (8 HGMMA a K step) instead of 32 warp MMAs, for twice the x tile's shared
    memory."""
    from pallas_kernels.lora_matmul import MatmulConfig

    wide = projection_report("qkv", 32, lora="none", config=MatmulConfig(min_block_m=64))
    [kernel] = wide
    assert kernel.name.startswith("lora_matmul_bm64_")
    assert kernel.loop_counts["HGMMA"] == 8 and kernel.loop_counts["HMMA"] == 0
    assert kernel.mma == ("v3 warps [4, 1]",)


def test_large_block_warps_remove_gate_up_spills():
    """gate|up at T = 128 (blocks of 128 x 128, a float32 accumulator of 128 registers a
    thread with 4 warps): Triton spills inside the K loop (local loads and stores, LDL / STL).
    MatmulConfig.large_block_num_warps=8 runs such blocks with 8 warps, and nothing spills; a
    smaller block (q|k|v, 128 x 64) keeps 4 warps."""
    from pallas_kernels.lora_matmul import MatmulConfig

    default = _one(projection_report("gate_up", 128, lora="none"), "lora_matmul_bm128")
    assert default.num_warps == 4 and default.loop_counts["LDL"] > 0
    assert default.loop_counts["STL"] > 0
    wide = MatmulConfig(large_block_num_warps=8)
    eight = _one(projection_report("gate_up", 128, lora="none", config=wide), "lora_matmul_bm128")
    assert eight.num_warps == 8 and eight.name.endswith("_w8_s4")
    assert eight.kernel_counts["LDL"] == eight.kernel_counts["STL"] == 0
    assert eight.loop_instructions < default.loop_instructions
    qkv = _one(projection_report("qkv", 128, lora="none", config=wide), "lora_matmul_bm128")
    assert qkv.num_warps == 4 and qkv.name.endswith("_w4_s4")


def test_sgmv_report_reads_both_regimes():
    """Issue 3's kernels: at T = 16 the decode shrink and expand run on the CUDA cores (fused
    adds, 16-byte loads, no MMA); at T = 256 the prefill shrink's K loop runs warp MMAs on
    asynchronous copies, and the expand's column steps read y with plain loads (Triton
    pipelines only the loads that feed a dot). ``per_token`` runs the decode kernels at 256."""
    decode = {r.name.split("_bn")[0].split("_rows")[0]: r for r in sgmv_report(16, out="4096")}
    assert set(decode) == {"sgmv_shrink_decode", "sgmv_expand_decode"}
    for kernel in decode.values():
        assert kernel.mma == () and kernel.kernel_counts["FFMA"] > 0
        assert kernel.kernel_counts["LDG.128"] > 0
    shrink, expand = sgmv_report(256, out="4096")
    assert shrink.name.startswith("sgmv_shrink_prefill") and expand.name.startswith(
        "sgmv_expand_prefill"
    )
    assert shrink.loop_counts["HMMA"] > 0 and shrink.loop_counts["LDGSTS"] > 0
    assert shrink.loop_counts["LDG"] == 0
    assert expand.loop_counts["HMMA"] > 0 and expand.loop_counts["LDG.128"] > 0
    # per_token: the decode kernels at T = 256 with the per-token knobs, on the CUDA cores.
    per_token = sgmv_report(256, out="4096", per_token=True)
    assert [r.name for r in per_token] == [
        "sgmv_shrink_per_token_rows4_bk512_w4_s4",
        "sgmv_expand_per_token_bn1024_rc16_t2_w4_s3",
    ]
    assert all(r.mma == () and r.kernel_counts["LDG.128"] > 0 for r in per_token)


def test_k_loop_reads_the_loop_with_the_most_mmas():
    sass = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
.L_x_0:
        /*0010*/                   HMMA.16816.F32.BF16 R4, R8, R12, R4 ;
        /*0020*/              @!P0 BRA `(.L_x_0) ;
.L_x_1:
        /*0030*/                   LDGSTS.E.BYPASS.128 [R2], desc[UR4][R6.64] ;
        /*0038*/               @P2 LDG.E.128.CONSTANT R16, desc[UR4][R6.64] ;
        /*0040*/                   HMMA.16816.F32.BF16 R4, R8, R12, R4 ;
        /*0050*/                   HMMA.16816.F32.BF16 R4, R8, R14, R4 ;
        /*0060*/               @P1 BRA `(.L_x_1) ;
        /*0070*/                   EXIT ;
"""
    instructions, counts = k_loop(sass)
    assert instructions == 5 and counts["HMMA"] == 2 and counts["LDGSTS"] == 1
    assert counts["LDG"] == counts["LDG.128"] == 1
    assert k_loop("        /*0000*/                   EXIT ;") == (0, {})


def test_bad_report_arguments_raise_config_errors():
    with pytest.raises(ConfigError, match="group 'qk'"):
        projection_report("qk", 32)
    with pytest.raises(ConfigError, match="lora 'sgmv'"):
        projection_report("o", 32, lora="sgmv")


def test_residual_norm_loads_its_rows_in_vectors():
    """pallas_kernels/residual_norm.py at the model's width (4096, a power of two) loads each
    row as one contiguous slice: 128-bit vector loads, 20 a thread with 8 warps (4 float32
    parts, h and the scale row). Indexed by a gathered column vector, Triton could not prove the
    columns contiguous and loaded every element on its own: 193 scalar loads a thread with 4
    warps. A width that is no power of two keeps the masked gather."""
    import jax
    import jax.numpy as jnp

    from jaxlora.bench.compiler_report import report
    from pallas_kernels.residual_norm import residual_rms_norm

    def kernel(width, warps):
        def fn(h, parts, scales, layer):
            return residual_rms_norm(h, parts, scales, layer, eps=1e-5, num_warps=warps)

        structs = (
            jax.ShapeDtypeStruct((32, width), jnp.bfloat16),
            jax.ShapeDtypeStruct((4, 32, width), jnp.float32),
            jax.ShapeDtypeStruct((32, width), jnp.bfloat16),
            jax.ShapeDtypeStruct((), jnp.int32),
        )
        return _one(report(fn, *structs), "residual_rms_norm")

    vectors = kernel(4096, 8).kernel_counts
    assert vectors["LDG.128"] == 20 and vectors["LDG"] <= 21
    gathered = kernel(4000, 8).kernel_counts
    assert gathered["LDG.128"] == 0 and gathered["LDG"] > 4 * vectors["LDG"]


def test_residual_norm_shrink_loads_in_vectors_without_spills():
    """The norm with the q|k|v shrink (pallas_kernels/residual_norm.py, the model's shapes:
    4,096 wide, 4 float32 parts, rank 16 in pages of 16, bf16) compiled for sm_90: each thread
    loads its share of the row (4 parts, h, the scale: 10) and of its 8 A rows (8) in 128-bit
    vectors, 16 warps, and keeps everything in registers (no local-memory spill)."""
    import jax
    import jax.numpy as jnp

    from jaxlora.bench.compiler_report import report
    from pallas_kernels.residual_norm import residual_rms_norm_shrink

    def fn(h, parts, scales, layer, a_pool, a_pages, ranks, slots):
        return residual_rms_norm_shrink(
            h, parts, scales, layer, a_pool, a_pages, ranks, slots, eps=1e-5, weights=(0, 1, 2)
        )

    structs = (
        jax.ShapeDtypeStruct((32, 4096), jnp.bfloat16),
        jax.ShapeDtypeStruct((4, 32, 4096), jnp.float32),
        jax.ShapeDtypeStruct((32, 4096), jnp.bfloat16),
        jax.ShapeDtypeStruct((), jnp.int32),
        jax.ShapeDtypeStruct((32, 64, 16, 4096), jnp.bfloat16),
        jax.ShapeDtypeStruct((8, 7, 1), jnp.int32),
        jax.ShapeDtypeStruct((8, 7), jnp.int32),
        jax.ShapeDtypeStruct((32,), jnp.int32),
    )
    kernel = _one(report(fn, *structs), "residual_rms_norm_shrink")
    assert kernel.num_warps == 16
    counts = kernel.kernel_counts
    assert counts["LDG.128"] == 18
    assert counts["LDL"] == 0 and counts["STL"] == 0


def test_swiglu_shrink_loads_in_vectors_without_spills():
    """SwiGLU with down's shrink (pallas_kernels/swiglu.py, the model's shapes: intermediate
    11,008 walked in power-of-two pieces of at most 4,096, rank 16 in pages of 16, bf16)
    compiled for sm_90: 25 of its 38 global loads a thread are 128-bit vectors (the two
    smallest pieces, 512 and 256 columns, are narrower than 16 bytes a thread with 16 warps),
    and nothing spills to local memory. Each piece of gate|up is loaded once a program (the
    first version loaded chunk 0's twice, to store hidden and to dot it: 29 of 46)."""
    import jax
    import jax.numpy as jnp

    from jaxlora.bench.compiler_report import report
    from pallas_kernels.swiglu import swiglu_shrink

    def fn(gate_up, a_pool, a_pages, ranks, slots, layer):
        return swiglu_shrink(gate_up, a_pool, a_pages, ranks, slots, layer, weights=(6,))

    structs = (
        jax.ShapeDtypeStruct((32, 22016), jnp.bfloat16),
        jax.ShapeDtypeStruct((32, 64, 16, 11008), jnp.bfloat16),
        jax.ShapeDtypeStruct((8, 7, 1), jnp.int32),
        jax.ShapeDtypeStruct((8, 7), jnp.int32),
        jax.ShapeDtypeStruct((32,), jnp.int32),
        jax.ShapeDtypeStruct((), jnp.int32),
    )
    kernel = _one(report(fn, *structs), "swiglu_shrink")
    counts = kernel.kernel_counts
    assert kernel.num_warps == 16
    assert counts["LDG.128"] == 25 and counts["LDG"] == 38
    assert counts["LDL"] == 0 and counts["STL"] == 0


def test_attention_shrink_reads_its_heads_a_columns_in_vectors():
    """Paged attention with o's shrink (pallas_kernels/paged_attention.py, the 7B decode
    shapes: 32 heads of 128, pages of 16 tokens, rank 16 in one page of 16, bf16, the heuristic
    config: one split, 4 warps) compiled for sm_90: the A tile of a program's head (16 rank rows
    x 128 columns) comes in 128-bit loads, and nothing spills to local memory; the plain
    attention kernel's own loads are unchanged by it."""
    import jax
    import jax.numpy as jnp

    from jaxlora.bench.compiler_report import report
    from pallas_kernels.paged_attention import paged_attention, paged_attention_shrink

    cache = (
        jax.ShapeDtypeStruct((32, 32, 128), jnp.bfloat16),
        jax.ShapeDtypeStruct((32, 256, 16, 32, 128), jnp.bfloat16),
        jax.ShapeDtypeStruct((32, 256, 16, 32, 128), jnp.bfloat16),
        jax.ShapeDtypeStruct((32, 8), jnp.int32),
        jax.ShapeDtypeStruct((32,), jnp.int32),
        jax.ShapeDtypeStruct((), jnp.int32),
    )
    tables = (
        jax.ShapeDtypeStruct((32, 64, 16, 4096), jnp.bfloat16),
        jax.ShapeDtypeStruct((8, 7, 1), jnp.int32),
        jax.ShapeDtypeStruct((8, 7), jnp.int32),
        jax.ShapeDtypeStruct((32,), jnp.int32),
    )

    def fused(*args):
        return paged_attention_shrink(*args, sm_scale=0.1, weights=(3,))

    def plain(*args):
        return paged_attention(*args, sm_scale=0.1)

    kernel = _one(report(fused, *cache, *tables), "paged_attention")
    alone = _one(report(plain, *cache), "paged_attention")
    assert kernel.name.endswith("_shrink") and kernel.num_warps == 4
    counts, plain_counts = kernel.kernel_counts, alone.kernel_counts
    assert counts["LDL"] == 0 and counts["STL"] == 0
    # 16 x 128 bf16 over 128 threads: 16 elements, two 128-bit loads a thread.
    assert counts["LDG.128"] - plain_counts["LDG.128"] >= 2, (counts, plain_counts)
