"""Parameter counts of the 671B configuration, built on the meta device (no memory used).

Hand count (docs/design.md sizes: D=7168, 61 layers of which 3 dense, 128 heads,
Rq=1536, C=512, dn=128, dr=64, dv=128, 256 routed + 1 shared experts of I=2048, V=129280):

MLA per layer
    q_a_proj        D*Rq            = 7168*1536          =  11,010,048
    q_a_layernorm   Rq                                   =       1,536
    q_b_proj        Rq*H*(dn+dr)    = 1536*128*192       =  37,748,736
    kv_a_proj       D*(C+dr)        = 7168*576           =   4,128,768
    kv_a_layernorm  C                                    =         512
    kv_b_proj       C*H*(dn+dv)     = 512*128*256        =  16,777,216
    o_proj          H*dv*D          = 16384*7168         = 117,440,512
    total                                                = 187,107,328
two block norms 2*D = 14,336
dense SwiGLU    3*D*18432                                = 396,361,728
MoE             routed 256*3*D*I = 256*44,040,192        = 11,274,289,152
                shared 3*D*I                             =      44,040,192
                gate weight 256*D                        =       1,835,008
                (the routing bias is a buffer, not a parameter)
                total                                    = 11,320,164,352
dense layer  = 187,107,328 + 14,336 + 396,361,728        =     583,483,392
MoE layer    = 187,107,328 + 14,336 + 11,320,164,352     =  11,507,286,016
main = 3*583,483,392 + 58*11,507,286,016 + embedding and head 2*V*D (1,853,358,080)
       + final norm 7,168
     = 1,750,450,176 + 667,422,588,928 + 1,853,358,080 + 7,168 = 671,026,404,352
MTP  = one MoE layer 11,507,286,016 + enorm, hnorm 14,336 + eh_proj 2*D*D 102,760,448
       + shared_head.norm 7,168 (embedding and head are shared)      =  11,610,067,968
activated = main - 58 layers * (256 - 8) inactive experts * 44,040,192
          = 671,026,404,352 - 633,474,121,728                        =  37,552,282,624
"""

import dataclasses

import pytest
import torch

from dsv3.config import ModelConfig
from dsv3.model import Transformer, count_parameters

V3_671B = dict(
    vocab_size=129280,
    dim=7168,
    inter_dim=18432,
    moe_inter_dim=2048,
    n_layers=61,
    n_dense_layers=3,
    n_heads=128,
    n_routed_experts=256,
    n_shared_experts=1,
    n_activated_experts=8,
    n_expert_groups=8,
    n_limited_groups=4,
    route_scale=2.5,
    q_lora_rank=1536,
    kv_lora_rank=512,
    qk_nope_head_dim=128,
    qk_rope_head_dim=64,
    v_head_dim=128,
    max_seq_len=4096,
    rope_factor=40.0,
    original_seq_len=4096,
    beta_fast=32.0,
    beta_slow=1.0,
    mscale=1.0,
    mtp_depth=1,
    rms_norm_eps=1e-6,
    init_std=0.006,
)


def test_671b_counts_on_meta():
    cfg = ModelConfig(**V3_671B)
    with torch.device("meta"):
        model = Transformer(cfg)
    counts = count_parameters(model)
    assert counts["main"] == 671_026_404_352
    assert counts["mtp"] == 11_610_067_968
    assert counts["total"] == 671_026_404_352 + 11_610_067_968
    assert counts["activated"] == 37_552_282_624
    assert all(p.device.type == "meta" for p in model.parameters())


def test_671b_per_layer_counts_match_hand_count():
    cfg = ModelConfig(**V3_671B)
    with torch.device("meta"):
        model = Transformer(cfg)

    def n(module):
        return sum(p.numel() for p in module.parameters())

    assert n(model.layers[0].self_attn) == 187_107_328
    assert n(model.layers[0]) == 583_483_392
    assert n(model.layers[3]) == 11_507_286_016
    assert n(model.layers[3].mlp.experts) == 256 * 3 * 7168 * 2048
    assert n(model.mtp[0]) == 11_610_067_968


@pytest.mark.parametrize("mtp_depth", [0, 1, 2])
@pytest.mark.parametrize("q_lora_rank", [0, 8])
def test_flops_per_token_counts_every_activated_matmul(mtp_depth, q_lora_rank):
    """flops_per_token against a count over the model's own weight matrices: every matrix
    except the embedding, routed experts at K/E of their size, the shared output head once
    more per MTP depth; 6 FLOPs per weight and token, plus 3 x (QK^T + PV) over the causal
    half per layer and MTP block."""
    from dsv3.model import flops_per_token

    cfg = ModelConfig(
        vocab_size=100,
        dim=16,
        inter_dim=40,
        moe_inter_dim=8,
        n_layers=3,
        n_dense_layers=1,
        n_heads=2,
        n_routed_experts=6,
        n_activated_experts=2,
        n_expert_groups=1,
        n_limited_groups=1,
        q_lora_rank=q_lora_rank,
        kv_lora_rank=12,
        qk_nope_head_dim=6,
        qk_rope_head_dim=4,
        v_head_dim=5,
        max_seq_len=64,
        mtp_depth=mtp_depth,
    )
    with torch.device("meta"):
        model = Transformer(cfg)
    weights = 0.0
    for name, p in model.named_parameters():
        if p.ndim < 2 or name == "embed_tokens.weight":
            continue
        weights += p.numel() * (2 / 6 if ".experts." in name else 1)
    weights += mtp_depth * 100 * 16  # each MTP depth runs the shared lm_head again
    T = 32
    scores = (3 + mtp_depth) * 2 * T * ((6 + 4) + 5)  # per layer: heads * T * (qk + v) forward, causal half
    assert flops_per_token(cfg, T) == pytest.approx(6 * weights + 3 * scores, rel=1e-12)
    main_only = flops_per_token(dataclasses.replace(cfg, mtp_depth=0), T)
    assert main_only == pytest.approx(
        6
        * (
            weights
            - mtp_depth * 100 * 16
            - sum(
                p.numel() * (2 / 6 if ".experts." in n else 1) for n, p in model.mtp.named_parameters() if p.ndim >= 2
            )
        )
        + 3 * 3 * 2 * T * 15,
        rel=1e-12,
    )
