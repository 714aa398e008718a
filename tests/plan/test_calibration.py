"""The estimate against measured peak memory of real training steps on this machine.

Each setting runs in a fresh process (``lorakit.plan.measure``): a few lorakit training steps
of the embedded SmolLM2-135M, every token supervised, on CPU at the precision `auto` picks (a
bf16 base for LoRA where the CPU has native bf16, else fp32). The estimate must be within
20% of the measured peak memory delta (the tolerance the issue sets; measured errors are in
docs/estimate.md). The CPU allocator factor in the estimate was fitted once on such runs; this
test checks that one factor still explains LoRA and QLoRA, at two sequence lengths.
"""

import pytest
import torch

from lorakit.plan.estimate import estimate
from lorakit.plan.measure import MeasureSpec, measure_in_subprocess
from lorakit.train.common import resolve_precision




@pytest.mark.slow
# QLoRA was 16-24% over its estimate here until the measurement took its baseline with
# bitsandbytes imported (+116 MB resident on import, not the run's memory) and the heap of
# the GGUF conversion handed back: 0.82-0.86 GiB at 128 tokens vs 0.80 estimated since
# one setting per method and per sequence length (each is a fresh process running the real
# model, ~15-25 s here; the four combinations measured are in docs/estimate.md)
@pytest.mark.parametrize("method,seq_len", [("lora", 256), ("qlora", 128)])
def test_estimate_within_20_percent_of_measured_peak(method, seq_len):
    measured = measure_in_subprocess(MeasureSpec(model="smollm2-135m-instruct", method=method,
                                                 seq_len=seq_len, steps=2))
    # the precision train.precision=auto ran at: a bf16 base on CPUs with native bf16 (LoRA)
    assert measured["precision"] == resolve_precision("auto", torch.device("cpu"), method == "qlora")
    assert measured["device"] == "cpu"
    predicted = estimate("smollm2-135m-instruct", method=method, seq_len=seq_len,
                         precision=measured["precision"], device="cpu").memory_bytes["total"]
    assert predicted == pytest.approx(measured["peak_delta_bytes"], rel=0.20), (
        f"predicted {predicted / 2**30:.3f} GiB, measured {measured['peak_delta_bytes'] / 2**30:.3f}")
