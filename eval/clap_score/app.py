"""Gradio widget of the `clap_score` metric: the Space app that `evaluate-cli create` writes.

    python eval/clap_score/app.py        # needs gradio 3.x (the README's sdk_version), see requirements.txt

As a Hugging Face Space, this folder is the Space's repository and the app loads clap_score.py beside it.
"""

from pathlib import Path

import evaluate
from evaluate.utils import launch_gradio_widget

# The module file beside this app (a path, not a Hub name: the same file in a checkout and in a Space).
module = evaluate.load(str(Path(__file__).resolve().with_name("clap_score.py")))
launch_gradio_widget(module)
