"""A transformers ``TrainerCallback`` that keeps GORP's full-rank weights in Trainer checkpoints.

Trainer saves only the PEFT adapter of a PEFT model, so the weights GorpAdamW trains full-rank are in no
checkpoint and a resumed run starts them from the pre-trained values. ``GorpCheckpointCallback`` writes them
(``slice_kernels.gorp.persist``) into every ``checkpoint-<step>`` folder and into ``output_dir`` at the end,
and copies them back when ``trainer.train(resume_from_checkpoint=...)`` resumes. The optimizer's own state
(moments, projectors, shared spaces, step counters) travels in Trainer's ``optimizer.pt`` already.
"""

from __future__ import annotations

import os

from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .. import distributed
from ..gorp.persist import (
    FULL_RANK_FILE,
    GorpCheckpointError,
    full_rank_parameters,
    load_full_rank_weights,
    save_full_rank_weights,
)


class GorpCheckpointCallback(TrainerCallback):
    """Save GORP's full-rank weights with every Trainer checkpoint and restore them on resume.

    Args:
        resume_from_checkpoint: the checkpoint folder to restore from when it is not
            ``<output_dir>/checkpoint-<step>`` (the folder ``trainer.train(resume_from_checkpoint=True)`` picks).
            Trainer does not tell callbacks which folder it resumed from; a resumed state (global step > 0 at
            the start of training) whose folder has no full-rank weights is an error, never a silent restart.
    """

    def __init__(self, resume_from_checkpoint: str | None = None):
        self.resume_from_checkpoint = resume_from_checkpoint
        self.restored_from: str | None = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        params = full_rank_parameters(model)
        if not params:
            raise GorpCheckpointError(
                "GorpCheckpointCallback: the model has no trainable weight outside its PEFT adapter; build the GORP "
                "optimizer (build_gorp_optimizer unfreezes the full-rank weights) before trainer.train(), or drop "
                "the callback"
            )
        if state.global_step == 0:
            return
        folder = self.resume_from_checkpoint or os.path.join(
            args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        )
        if not os.path.isfile(os.path.join(folder, FULL_RANK_FILE)):
            raise GorpCheckpointError(
                f"resuming at step {state.global_step}, but {folder!r} has no {FULL_RANK_FILE}: the full-rank weights "
                f"would restart from the pre-trained values. Pass GorpCheckpointCallback(resume_from_checkpoint=<the "
                f"folder given to trainer.train>) if it is elsewhere; a checkpoint saved without the callback cannot "
                f"be resumed exactly"
            )
        meta = load_full_rank_weights(model, folder)
        saved = meta.get("global_step")
        if saved is not None and int(saved) != state.global_step:
            raise GorpCheckpointError(
                f"{folder!r} holds the full-rank weights of step {saved}, but training resumes at step "
                f"{state.global_step}; point resume_from_checkpoint at the folder trainer.train resumes from"
            )
        self.restored_from = folder

    def on_save(self, args, state, control, model=None, **kwargs):
        err = None
        if args.should_save:  # the ranks hold identical weights; the processes Trainer saves the model on write them
            try:
                folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
                if not os.path.isdir(folder):
                    raise GorpCheckpointError(
                        f"GorpCheckpointCallback: Trainer's checkpoint folder {folder!r} is not there (a "
                        f"hyperparameter search writes its runs elsewhere, which the callback does not follow); save "
                        f"with save_full_rank_weights(model, <the checkpoint folder>) from your own callback instead"
                    )
                save_full_rank_weights(model, folder, step=state.global_step)
            except Exception as e:
                err = e
        distributed.agree(err, "GorpCheckpointCallback: saving the full-rank weights")  # no rank left waiting

    def on_train_end(self, args, state, control, model=None, **kwargs):
        err = None
        try:
            if args.load_best_model_at_end and state.best_model_checkpoint:
                # Trainer reloaded the best checkpoint's adapter; its full-rank weights belong with it
                load_full_rank_weights(model, state.best_model_checkpoint)
            if args.should_save:
                save_full_rank_weights(model, args.output_dir, step=state.global_step)
        except Exception as e:
            err = e
        distributed.agree(err, "GorpCheckpointCallback: the full-rank weights at the end of training")


__all__ = ["GorpCheckpointCallback"]
