"""Published figures of the TPU chips `--mode=compile` plans for: memory, peak compute, bandwidth.

One row per chip generation, keyed by the prefix of a topology name that
libtpu accepts ('v5e:4x4' -> 'v5e'). Figures are per chip, from Google
Cloud's system-architecture pages (read 2026-06):

  v4   https://cloud.google.com/tpu/docs/v4   32 GiB HBM2, 1,200 GB/s, 275 TFLOP/s bf16
  v5e  https://cloud.google.com/tpu/docs/v5e  16 GiB HBM2, 819 GB/s, 197 TFLOP/s bf16
  v5p  https://cloud.google.com/tpu/docs/v5p  95 GiB HBM2e, 2,765 GB/s, 459 TFLOP/s bf16
  v6e  https://cloud.google.com/tpu/docs/v6e  32 GiB HBM, 1,640 GB/s, 918 TFLOP/s bf16

v4 and v5p chips hold two TensorCores that JAX drives as one device
("megacore"), as on a TPU VM; libtpu is asked for that chip configuration so
that one compiled device is one chip. The per-device figures then equal the
chip's.
"""

import dataclasses

GIB = 1024**3


@dataclasses.dataclass(frozen=True)
class Chip:
    """One TPU generation's published per-chip figures.

    Attributes:
      name: the topology-name prefix ('v5e').
      device_kind: what JAX's devices report as `device_kind` ('TPU v5 lite').
      hbm_bytes: high-bandwidth memory per chip, bytes.
      peak_bf16_flops: peak dense bfloat16 FLOP/s per chip.
      hbm_bytes_per_s: HBM bandwidth per chip, bytes/s.
      megacore: two TensorCores run as one JAX device (libtpu's 'megacore'
        chip configuration).
    """

    name: str
    device_kind: str
    hbm_bytes: int
    peak_bf16_flops: float
    hbm_bytes_per_s: float
    megacore: bool = False


CHIPS: dict[str, Chip] = {
    chip.name: chip
    for chip in (
        Chip("v4", "TPU v4", 32 * GIB, 275e12, 1200e9, megacore=True),
        Chip("v5e", "TPU v5 lite", 16 * GIB, 197e12, 819e9),
        Chip("v5p", "TPU v5", 95 * GIB, 459e12, 2765e9, megacore=True),
        Chip("v6e", "TPU v6 lite", 32 * GIB, 918e12, 1640e9),
    )
}


def chip_of(topology: str) -> Chip:
    """The chip of a topology name such as 'v5e:4x4' or 'v4:2x2x2'.

    Raises:
      ValueError: naming the topology and the generations known.
    """
    prefix = topology.split(":", 1)[0].split("-", 1)[0].lower()
    if prefix not in CHIPS:
        raise ValueError(
            f"config.compile.topology={topology!r}: unknown TPU generation {prefix!r}; "
            f"use one of {sorted(CHIPS)} followed by a shape, e.g. v5e:4x4 or v4:2x2x2"
        )
    return CHIPS[prefix]
