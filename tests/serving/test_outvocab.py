"""Serving students with a restricted output vocabulary (`DistilleryTrimmedLlamaForCausalLM`) on real vLLM engines,
through the gRPC service: the swap from a full student to a trimmed one (a new engine), between two trimmed ones with
the same head size but different token ids (the in-place reload), and malformed id maps refused.

The tests share the module's service (conftest `served`) and run in file order.
"""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
import torch
from safetensors.torch import load_file, save_file

from services.common import pb
from services.common.outvocab import TOKEN_IDS
from services.serving.swap import load_checkpoint
from tests.serving.conftest import Served, TinyModels, register
from tests.serving.test_serving import collect, request

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]

#: bf16 engines (the default on CPUs with native bf16) against the float32 reference: a greedy token may differ from
#: the reference's argmax only where the two are this close in log-probability (tests/common/test_outvocab_vllm.py
#: checks exact equality on a float32 engine).
BF16_LOGPROB_TOLERANCE = 0.05
ROWS = 448
#: Two heads of ROWS rows: the special tokens (ids 0-2) and the even ids, or the special tokens and the odd ids.
EVEN = sorted({0, 1, 2, *range(4, 1024, 2)})[:ROWS]
ODD = sorted({0, 1, 2, *range(3, 1024, 2)})[:ROWS]


@pytest.fixture(scope="module")
def trimmed(tiny_models: TinyModels, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from services.common.outvocab import trim_folder

    root = tmp_path_factory.mktemp("trimmed")
    trim_folder(tiny_models.v2, EVEN, root / "even")
    trim_folder(tiny_models.v3, ODD, root / "odd")
    return {"even": root / "even", "odd": root / "odd"}


async def generated(served: Served, max_tokens: int, **sampling: float) -> tuple[int, list[int]]:
    chunks = await collect(served.stub, request(max_tokens=max_tokens, **sampling))
    return chunks[-1].model_version, [t for c in chunks for t in c.token_ids]


def assert_greedy_matches_reference(folder: Path, served: Served, tokens: list[int]) -> None:
    """The served greedy tokens are the float32 Hugging Face model's argmax at every step (within bf16 tolerance)."""
    from services.common.models import load_causal_lm

    engine = served.app.holder.current.engine
    prompt = engine.encode_chat((("user", "Tom has 3 apples and buys 5 more. How many apples?"),))
    reference = load_causal_lm(folder, dtype=torch.float32)
    with torch.no_grad():
        logits = reference(torch.tensor([prompt + tokens])).logits[0, len(prompt) - 1 : -1].float()
    logprobs = torch.log_softmax(logits, dim=-1)
    chosen = logprobs[torch.arange(len(tokens)), torch.tensor(tokens)]
    assert (logprobs.max(-1).values - chosen).max().item() < BF16_LOGPROB_TOLERANCE, (tokens, logprobs.argmax(-1))


async def test_full_to_trimmed_starts_an_engine_that_only_emits_head_ids(
    served: Served, trimmed: dict[str, Path]
) -> None:
    await served.app.swapper.wait_idle()
    _, full_tokens = await generated(served, 64, temperature=1.0)
    assert not set(full_tokens) <= set(EVEN)  # the full student does emit ids outside the head
    before = served.app.holder.current
    ckpt = register(served.registry, trimmed["even"])
    reply = await served.stub.LoadModel(pb.serving.LoadModelRequest(registry_uri=ckpt.uri))
    assert reply.model.version == ckpt.version
    after = served.app.holder.current
    assert not after.model.swappable_with(before.model) and after.engine is not before.engine  # a new engine
    # It samples over the head's rows (the full student's engine samples over the vocabulary).
    assert getattr(after.engine, "head_sampling", None) is True
    assert getattr(before.engine, "head_sampling", None) is False
    version, sampled = await generated(served, 96, temperature=1.0)
    assert version == ckpt.version and len(sampled) == 96
    assert set(sampled) <= set(EVEN)
    _, greedy = await generated(served, 8, temperature=0.0)
    assert_greedy_matches_reference(trimmed["even"], served, greedy)


async def test_trimmed_to_trimmed_reload_takes_the_new_token_ids(served: Served, trimmed: dict[str, Path]) -> None:
    """Same head size, other ids: the same fingerprint, so the weights are reloaded into an idle engine in place,
    and the id map must come with them."""
    await served.app.swapper.wait_idle()
    ckpt = register(served.registry, trimmed["odd"])
    model = load_checkpoint(served.registry, ckpt.uri)
    assert model.swappable_with(served.app.holder.current.model)
    result = await served.app.swapper.swap_to(model)
    assert result.path == "reload"
    version, sampled = await generated(served, 96, temperature=1.0)
    assert version == ckpt.version
    assert set(sampled) <= set(ODD)
    assert set(sampled) - set(EVEN)  # ids only the new head has: the new map is in use, not the old one
    _, greedy = await generated(served, 8, temperature=0.0)
    assert_greedy_matches_reference(trimmed["odd"], served, greedy)


def _rewrite_ids(kind: str) -> object:
    def mutate(folder: Path) -> None:
        weights = load_file(str(folder / "model.safetensors"))
        ids = weights[TOKEN_IDS].clone()
        if kind == "not_ascending":
            ids[[5, 6]] = ids[[6, 5]]
        elif kind == "out_of_range":
            ids[-1] = 1_000_000
        elif kind == "wrong_length":
            ids = ids[:-1]
        weights[TOKEN_IDS] = ids
        save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})

    return mutate


MALFORMED = {
    "not_ascending": "strictly ascending",
    "out_of_range": "must be in [0, 1024)",
    "wrong_length": f"config.output_vocab_size={ROWS} but lm_head.token_ids has {ROWS - 1} ids",
}


@pytest.mark.parametrize("kind", sorted(MALFORMED))
async def test_malformed_token_ids_are_refused_while_the_old_version_serves(
    served: Served, trimmed: dict[str, Path], kind: str
) -> None:
    await served.app.swapper.wait_idle()
    before = await served.version()
    ckpt = register(served.registry, trimmed["even"], mutate=_rewrite_ids(kind))  # type: ignore[arg-type]
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await served.stub.LoadModel(pb.serving.LoadModelRequest(registry_uri=ckpt.uri))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "malformed output vocabulary" in err.value.details() and MALFORMED[kind] in err.value.details()
    assert await served.version() == before
    version, tokens = await generated(served, 8, temperature=1.0)
    assert version == before and set(tokens) <= set(ODD)
