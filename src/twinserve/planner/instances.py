"""SageMaker inference instance types the planner chooses from, as data.

Prices change (AWS lowered some GPU prices in 2025; new families arrive): each row carries
the date its price was taken, and the planner prints it next to every cost. They are
on-demand list prices of SageMaker AI real-time inference ("hosting") in us-east-1, USD
per instance-hour, as published on https://aws.amazon.com/sagemaker/ai/pricing/ and
returned by the AWS Price List API (service AmazonSageMaker). They were cross-checked on
2026-11-22 (`PRICES_CHECKED`) against several public copies of that price list. Each SageMaker row is
the EC2 price with SageMaker's markup (e.g. ml.g5.xlarge 1.408 = g5.xlarge 1.006 × 1.4),
which is how odd-looking digits can be verified. The p4d/p5 rows are the hosting list
prices from before AWS's June 2025 EC2 price cut for P4/P5. Check the pricing page (or
`aws pricing get-products --service-code AmazonSageMaker`) before quoting a budget.

GPU facts: `memory_gib` is what `nvidia-smi` reports as total memory (what CUDA can
allocate from), not the marketing GB: an A10G "24 GB" is 23028 MiB = 22.49 GiB.
`bandwidth_gbs` and `dense_tflops` (bf16/fp16 tensor cores, no sparsity) are NVIDIA's
data-sheet peaks; the planner applies its own utilisation factors to them (`sizing.py`).
CPU rows carry effective, not peak, numbers (see `CPU_GBS_PER_VCPU`).
"""

from __future__ import annotations

from datetime import date

from pydantic import BaseModel, ConfigDict, Field

from twinserve.errors import ValidationError

PRICES_CHECKED = date(2026, 11, 22)
PRICE_REGION = "us-east-1"
HOURS_PER_MONTH = 730.0  # AWS's own convention for monthly estimates

# Sapphire Rapids (c7i/m7i) with AMX, as twinserve's engine runs on them. Effective values:
# one vCPU streams ~5 GB/s of weights in decode (8 DDR5 channels shared by 96 vCPUs, ~60%
# reached), and prefill reaches ~0.3 TFLOPS bf16 per vCPU (config.py's measurement: 768
# prompt tokens of the 135M model in ~250 ms on 2 vCPUs is ~0.8 TFLOPS; rounded down).
CPU_GBS_PER_VCPU = 5.0
CPU_TFLOPS_PER_VCPU = 0.3


class Accelerator(BaseModel):
    """One GPU model: what it holds and how fast it reads and computes."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(description="Model name, e.g. NVIDIA A10G.")
    nominal: str = Field(description="Marketing memory size and type, e.g. '24 GB GDDR6'.")
    memory_gib: float = Field(gt=0, description="Total memory as nvidia-smi reports it, GiB.")
    bandwidth_gbs: float = Field(gt=0, description="Peak memory bandwidth, GB/s (data sheet).")
    dense_tflops: float = Field(gt=0, description="Peak dense bf16/fp16 tensor TFLOPS (data sheet).")
    bf16: bool = Field(description="Runs bfloat16 natively (Ampere and later); T4 does not.")


class InstanceType(BaseModel):
    """One SageMaker instance type with its on-demand price."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(
        pattern=r"^ml\.[a-z0-9]+\.[a-z0-9]+$", description="SageMaker name, e.g. ml.g5.2xlarge."
    )
    vcpus: int = Field(ge=1, description="vCPUs (hyper-threads: two per physical core).")
    host_memory_gib: float = Field(gt=0, description="Host RAM, GiB.")
    gpu: Accelerator | None = Field(None, description="GPU model; None for a CPU instance.")
    gpu_count: int = Field(0, ge=0, description="GPUs on the instance (0 for CPU instances).")
    nvlink: bool = Field(
        False, description="GPUs talk over NVLink (else PCIe): tensor parallelism scales better."
    )
    usd_per_hour: float = Field(gt=0, description=f"On-demand SageMaker hosting price, {PRICE_REGION}, USD.")
    price_date: date = Field(PRICES_CHECKED, description="When the price was taken.")

    @property
    def is_gpu(self) -> bool:
        return self.gpu is not None and self.gpu_count > 0

    @property
    def cpu_bandwidth_gbs(self) -> float:
        """Effective decode bandwidth of the whole instance on CPU, GB/s."""
        return CPU_GBS_PER_VCPU * self.vcpus

    @property
    def cpu_tflops(self) -> float:
        """Effective prefill compute of the whole instance on CPU, TFLOPS."""
        return CPU_TFLOPS_PER_VCPU * self.vcpus

    @property
    def hardware(self) -> str:
        """One line for tables, e.g. '1× NVIDIA A10G 24 GB GDDR6' or 'CPU: 4 vCPU, 8 GiB'."""
        if self.gpu is None:
            return f"CPU: {self.vcpus} vCPU, {self.host_memory_gib:g} GiB"
        return f"{self.gpu_count}× {self.gpu.name} {self.gpu.nominal}"


T4 = Accelerator(
    name="NVIDIA T4", nominal="16 GB GDDR6", memory_gib=15.0, bandwidth_gbs=320, dense_tflops=65, bf16=False
)
A10G = Accelerator(
    name="NVIDIA A10G", nominal="24 GB GDDR6", memory_gib=22.49, bandwidth_gbs=600, dense_tflops=70, bf16=True
)
L4 = Accelerator(
    name="NVIDIA L4", nominal="24 GB GDDR6", memory_gib=22.49, bandwidth_gbs=300, dense_tflops=121, bf16=True
)
L40S = Accelerator(
    name="NVIDIA L40S",
    nominal="48 GB GDDR6",
    memory_gib=44.99,
    bandwidth_gbs=864,
    dense_tflops=362,
    bf16=True,
)
A100_40GB = Accelerator(
    name="NVIDIA A100",
    nominal="40 GB HBM2",
    memory_gib=39.59,
    bandwidth_gbs=1555,
    dense_tflops=312,
    bf16=True,
)
H100 = Accelerator(
    name="NVIDIA H100",
    nominal="80 GB HBM3",
    memory_gib=79.65,
    bandwidth_gbs=3350,
    dense_tflops=989,
    bf16=True,
)


def _cpu(name: str, vcpus: int, memory_gib: float, price: float) -> InstanceType:
    return InstanceType(name=name, vcpus=vcpus, host_memory_gib=memory_gib, usd_per_hour=price)


def _gpu(
    name: str,
    vcpus: int,
    memory_gib: float,
    gpu: Accelerator,
    count: int,
    price: float,
    *,
    nvlink: bool = False,
) -> InstanceType:
    return InstanceType(
        name=name, vcpus=vcpus, host_memory_gib=memory_gib, gpu=gpu, gpu_count=count, nvlink=nvlink,
        usd_per_hour=price,
    )  # fmt: skip


# Cheapest first within each family; `make_plan` sorts by total cost anyway.
CATALOG: tuple[InstanceType, ...] = (
    _cpu("ml.c7i.xlarge", 4, 8, 0.2142),
    _cpu("ml.m7i.xlarge", 4, 16, 0.2419),
    _cpu("ml.c7i.2xlarge", 8, 16, 0.4284),
    _cpu("ml.c7i.4xlarge", 16, 32, 0.8568),
    _gpu("ml.g4dn.xlarge", 4, 16, T4, 1, 0.7364),
    _gpu("ml.g6.xlarge", 4, 16, L4, 1, 1.1267),
    _gpu("ml.g5.xlarge", 4, 16, A10G, 1, 1.408),
    _gpu("ml.g5.2xlarge", 8, 32, A10G, 1, 1.515),
    _gpu("ml.g6e.xlarge", 4, 32, L40S, 1, 2.61),
    _gpu("ml.g6.12xlarge", 48, 192, L4, 4, 5.752),
    _gpu("ml.g5.12xlarge", 48, 192, A10G, 4, 7.09),
    _gpu("ml.g6e.12xlarge", 48, 384, L40S, 4, 13.12),
    _gpu("ml.g5.48xlarge", 192, 768, A10G, 8, 20.36),
    _gpu("ml.p4d.24xlarge", 96, 1152, A100_40GB, 8, 37.688, nvlink=True),
    _gpu("ml.p5.48xlarge", 192, 2048, H100, 8, 113.068, nvlink=True),
)


def get_instance(name: str) -> InstanceType:
    """The catalog entry for `name`; ValidationError (422) naming the known ones otherwise."""
    for instance in CATALOG:
        if instance.name == name:
            return instance
    known = ", ".join(i.name for i in CATALOG)
    raise ValidationError(f"unknown instance type {name!r}; the planner knows: {known}")
