"""Keep third-party chatter out of a run's log: the log holds the project's lines and progress bars.

    from conceptcaps_pipeline.quiet import quiet_libraries
    quiet_libraries()        # the CLI calls it once per command (conceptcaps_pipeline.cli.configure_logging)

What the libraries print and what is done about it. Prevented at the source where this project
makes the call or the setting (so nothing is hidden that a user could act on); filtered here only
when the line comes from inside a library, each filter with its reason:

- transformers' "Loading weights" and "Writing model shards" bars (one per model load or save,
  ten in a smoke run): transformers' own progress bars are turned off. They are model I/O, not
  the work of a stage; the stages' own bars (tqdm, accelerate's) and the Trainer's are not
  touched, and hub downloads keep theirs (huggingface_hub's switch is a separate one).
- "Loading weights from local directory" (a bare `print` in huggingface_hub's
  PyTorchModelHubMixin): prevented in `BetaVAE._from_pretrained` (generation/vae/model.py).
- "Model config: pad_token_id / bos_token_id must be ... within the vocabulary (between 0 and
  N-1), got N" from transformers: filtered. MusicGen's decoder uses id = codebook size for its
  pad/bos token on purpose (its embedding has codebook size + 1 rows; every facebook/musicgen-*
  config does this and so do the tiny ones, DESIGN.md), and transformers' own MusicGen decoder
  config accepts it; only the composite MusicgenConfig runs the generic check with `< N`. The
  filter drops exactly that message with got == N, nothing else.
- FutureWarning "`is_gradient_checkpointing` is deprecated": filtered. peft reads the old
  property while wrapping the model in `get_peft_model`; this project never calls it.
- UserWarning "'pin_memory' argument is set as true but no accelerator is found": prevented in
  the captioner (`dataloader_pin_memory` follows the device, generation/captions/train.py).

Not handled here (the owner's module, or not Python's): faiss prints "WARNING clustering N points
to K centroids" from C++ when MAUVE clusters a small smoke-size sample (eval/caption_quality).
"""

from __future__ import annotations

import logging
import re
import warnings

# transformers' generic special-token check, as it reads for MusicGen: "... (between 0 and 2047), got 2048."
_MUSICGEN_TOKEN_ID = re.compile(r"^Model config: (?:pad|bos)_token_id must be `None` or an integer within the "
                                r"vocabulary \(between 0 and (\d+)\), got (\d+)\.")


def _not_musicgen_special_token(record: logging.LogRecord) -> bool:
    """False for transformers' pad/bos warning whose id is exactly the vocabulary size (MusicGen's design)."""
    match = _MUSICGEN_TOKEN_ID.match(record.getMessage())
    return not (match and int(match.group(2)) == int(match.group(1)) + 1)


def quiet_libraries() -> None:
    """Apply the settings and filters of the module docstring (idempotent: safe to call per command)."""
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    # transformers prints through its own handler (its logger does not propagate); the root's
    # handlers get the filter too, for a host that turned propagation on.
    library = transformers_logging._get_library_root_logger()
    for handler in [*library.handlers, *logging.getLogger().handlers]:
        if _not_musicgen_special_token not in handler.filters:
            handler.addFilter(_not_musicgen_special_token)
    warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)
