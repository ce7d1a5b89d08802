"""A transformers ``TrainerCallback`` that writes, beside every checkpoint, the adapter for the untouched base.

A SLICE / LoRA-GA / LoRAM init absorbs W − s·B₀·A₀ into the base weights, so the adapter in a Trainer (or TRL)
checkpoint fits only that changed base; its config carries slice-kernels' mark, which makes plain PEFT refuse
it. ``SliceSaveCallback`` saves the initial adapter once when training begins and, at every save and at the
end, converts the saved adapter (offline, from the files: ``convert_adapter``) into a plain rank-2r LoRA that
loads with ``PeftModel.from_pretrained`` on the original model.

Layout: ``<output_dir>/slice_init`` (the initial adapter), ``checkpoint-N/converted/lora_for_original_base`` and
``<output_dir>/converted/lora_for_original_base``. The converted adapter sits one folder deeper than
``checkpoint-N/<name>`` on purpose: Trainer's ``resume_from_checkpoint`` loads every direct subfolder holding
adapter files as an extra adapter of the model.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import warnings

from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .. import distributed
from ..errors import SliceInitError
from ..slice_init.artifacts import (
    WEIGHTS_NAME,
    check_initial_matches,
    config_scaling,
    convert_adapter,
    current_probes,
    lora_pairs,
    model_mark,
    probes_match,
    read_adapter,
)
from ..slice_init.peft import save_initial_adapter

CONVERTED_SUBDIR = os.path.join("converted", "lora_for_original_base")
INITIAL_SUBDIR = "slice_init"


class SliceSaveCallback(TrainerCallback):
    """Save the initial adapter at train begin, and a plain LoRA for the original base at every save and at the end.

    Args:
        initial_dir: where the initial adapter is (or goes); default ``<output_dir>/slice_init``. Its last
            component must be a plain word (PEFT uses it as a temporary adapter name).
        adapter_name: the PEFT adapter; only ``"default"`` (PEFT saves other names into subfolders).

    On a resumed run (the model's adapter is no longer at its init when training begins) the saved initial adapter
    is reused, never overwritten; it must exist and match the init's fingerprint. Only the main process writes.
    """

    def __init__(self, initial_dir: str | None = None, adapter_name: str = "default"):
        if adapter_name != "default":
            raise SliceInitError(
                f"SliceSaveCallback supports the adapter named 'default' (got {adapter_name!r}); create the model "
                f"with get_slice_model(..., adapter_name='default')"
            )
        self.initial_dir = initial_dir
        self.adapter_name = adapter_name
        self.active = True

    def _initial(self, args) -> str:
        return self.initial_dir or os.path.join(args.output_dir, INITIAL_SUBDIR)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        from peft import PeftModel

        if not isinstance(model, PeftModel):
            raise SliceInitError(
                f"SliceSaveCallback needs the PeftModel of get_slice_model as the Trainer's model, got "
                f"{type(model).__name__}"
            )
        mark = model_mark(model, self.adapter_name)
        if mark is None:
            self.active = False
            warnings.warn(
                "SliceSaveCallback: this adapter's init changed no base weight (no slice-kernels mark), so its "
                "checkpoints already fit the original model; the callback does nothing",
                stacklevel=2,
            )
            return
        err = None
        if state.is_world_process_zero:  # rank 0 checks and writes; every rank raises alike (no rank left waiting)
            try:
                self._prepare_initial(args, model, mark)
            except Exception as e:
                err = e
        distributed.agree(err, "SliceSaveCallback: checking or saving the initial adapter")

    def _prepare_initial(self, args, model, mark) -> None:
        init_dir = self._initial(args)
        at_init = probes_match(mark["probes"], current_probes(model, self.adapter_name), rtol=1e-9)
        saved = os.path.isfile(os.path.join(init_dir, WEIGHTS_NAME))
        if saved:
            # a resumed run (or a rerun of the same init): reuse it, after checking it is this init's
            icfg, isd = read_adapter(init_dir, "initial adapter")
            check_initial_matches(
                mark,
                lora_pairs(isd),
                config_scaling(icfg),
                init_dir,
                "the model being trained (delete it, or pass SliceSaveCallback(initial_dir=...) for a new run)",
            )
        elif at_init:
            save_initial_adapter(model, init_dir, self.adapter_name)
        else:
            raise SliceInitError(
                f"training resumes from a checkpoint but no initial adapter is in {init_dir!r}: the trained adapter "
                f"cannot be converted without it. Pass SliceSaveCallback(initial_dir=...) pointing to the one saved "
                f"when this training began"
            )

    def _convert(self, trained_dir: str, args) -> None:
        convert_adapter(trained_dir, self._initial(args), os.path.join(trained_dir, CONVERTED_SUBDIR))

    def on_save(self, args, state, control, **kwargs):
        if not self.active:
            return
        err = None
        if state.is_world_process_zero:
            try:
                ckpt = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
                self._convert(ckpt, args)
            except Exception as e:
                err = e
        distributed.agree(err, "SliceSaveCallback: converting the checkpoint")

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if not self.active:
            return
        err = None
        if state.is_world_process_zero:
            try:
                self._convert_final(args, model)
            except Exception as e:
                err = e
        distributed.agree(err, "SliceSaveCallback: converting the final adapter")

    def _convert_final(self, args, model) -> None:
        # the final weights (the best ones with load_best_model_at_end) are in no checkpoint folder: save, convert
        tmp = tempfile.mkdtemp(prefix=".slice-final-", dir=args.output_dir)
        try:
            model.save_pretrained(tmp, selected_adapters=[self.adapter_name])
            convert_adapter(tmp, self._initial(args), os.path.join(args.output_dir, CONVERTED_SUBDIR))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
