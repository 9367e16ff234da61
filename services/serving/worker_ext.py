"""vLLM worker extension: reload a checkpoint's weights into a running engine, correctly on CPU as well.

vLLM mixes this class into its worker (`worker_extension_cls`), so `collective_rpc("distillery_reload", ...)` runs
it inside the engine's worker process. Plain `reload_weights` misses one thing on the CPU build: linear layers run
on packed copies of their weights (oneDNN / sgl kernels) made when the weights are processed after loading, and a
tied LM head receives no weights of its own on reload, so it is never re-processed and keeps computing logits with
the *old* embedding matrix (measured: tokens and logprobs then differ from a freshly started engine). After the
reload every module that holds a packed copy of a tied weight is processed again.

This module is imported by vLLM's worker process: keep it free of heavy imports at module level. Importing it
registers the project's model classes there (a worker of the "mp" executor is spawned and builds its model after it
imports this module; vLLM is loaded in that process already).
"""

from __future__ import annotations

from typing import Any

from services.common.vllm_engine import register_models

register_models()


class WeightReloadExtension:
    """Methods added to vLLM's worker; `self` is the worker (it has `model_runner` and `reload_weights`)."""

    def distillery_reload(self, weights_path: str) -> dict[str, Any]:
        """Loads the safetensors weights under `weights_path` in place; returns what was re-processed and the digest
        of the restricted head's id map now loaded ("" for a full head: see `outvocab_vllm.token_ids_digest`)."""
        from services.common.outvocab_vllm import token_ids_digest

        worker: Any = self
        worker.reload_weights(weights_path=weights_path)
        model = worker.model_runner.get_model()
        head = getattr(model, "lm_head", None)
        return {
            "reprocessed": _reprocess_tied_heads(model),
            "output_vocab": token_ids_digest(getattr(head, "token_ids", None)),
        }

    def distillery_head_sampling(self) -> bool:
        """Samples over a restricted head's own rows from now on (`outvocab_sampler.install`); False for a model
        with a full-vocabulary head, which is left as it is."""
        from services.common.outvocab_sampler import install

        worker: Any = self
        return install(worker.model_runner)

    def distillery_clear_kv_cache(self) -> int:
        """Zeroes every KV-cache block; returns the bytes cleared.

        Attention kernels read whole blocks and mask the unused slots, and 0 × NaN is NaN: once weights that produce
        NaN have run, stale blocks poison later requests even after good weights are back (measured).
        """
        import torch

        worker: Any = self
        cleared = 0
        with torch.no_grad():
            for cache in worker.model_runner.kv_caches:
                if isinstance(cache, torch.Tensor):
                    cache.zero_()
                    cleared += cache.numel() * cache.element_size()
        return cleared


def _reprocess_tied_heads(model: Any) -> list[str]:
    """Re-runs weight processing for LM heads that share their weight with the input embedding."""
    import torch
    from vllm.model_executor.layers.quantization.base_config import QuantizeMethodBase

    embeddings = {
        module.weight.data_ptr()
        for name, module in model.named_modules()
        if name.endswith("embed_tokens") and isinstance(getattr(module, "weight", None), torch.Tensor)
    }
    done = []
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        method = getattr(module, "quant_method", None)
        if (
            name.endswith("lm_head")
            and isinstance(weight, torch.Tensor)
            and weight.numel() > 0
            and weight.data_ptr() in embeddings
            and isinstance(method, QuantizeMethodBase)
        ):
            with torch.no_grad():
                method.process_weights_after_loading(module)
            done.append(name)
    return done
