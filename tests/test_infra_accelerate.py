"""infra/accelerate: every launch config parses with accelerate's own strict loader and says what its name says."""

from __future__ import annotations

from pathlib import Path

import pytest
from accelerate.commands.config.config_args import load_config_from_file
from accelerate.utils import DistributedType

CONFIGS = Path(__file__).resolve().parents[1] / "infra" / "accelerate"

EXPECTED = {
    "cpu.yaml": (DistributedType.NO, 1, 1),
    "single_gpu.yaml": (DistributedType.NO, 1, 1),
    "ddp_8gpu.yaml": (DistributedType.MULTI_GPU, 8, 1),
    "fsdp_8gpu.yaml": (DistributedType.FSDP, 8, 1),
    "multinode_2x8.yaml": (DistributedType.MULTI_GPU, 16, 2),
}


def test_every_config_is_covered():
    assert sorted(p.name for p in CONFIGS.glob("*.yaml")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_config_parses_with_accelerate(name):
    config = load_config_from_file(str(CONFIGS / name))  # raises on unknown keys
    kind, processes, machines = EXPECTED[name]
    assert config.distributed_type == kind
    assert (config.num_processes, config.num_machines) == (processes, machines)
    cpu = name == "cpu.yaml"
    assert (config.mixed_precision, config.use_cpu) == (("no", True) if cpu else ("bf16", False))
    if kind == DistributedType.FSDP:
        # FSDP2, each family's blocks from the model's own _no_split_modules (no class list that fits one family)
        assert config.fsdp_config["fsdp_version"] == 2 and config.fsdp_config["fsdp_auto_wrap_policy"] == \
            "TRANSFORMER_BASED_WRAP" and "fsdp_transformer_layer_cls_to_wrap" not in config.fsdp_config
        from diffusers import Flux2Transformer2DModel, QwenImageTransformer2DModel

        for model in (Flux2Transformer2DModel, QwenImageTransformer2DModel):
            assert model._no_split_modules, model
    if machines > 1:
        assert config.main_process_port and config.rdzv_backend == "c10d"
