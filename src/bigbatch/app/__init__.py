"""The ``bigbatch`` command: an application built on the library, never imported by it.

``cli`` parses flags and config files into a :class:`~bigbatch.app.config.TrainConfig` and calls a
command: ``train`` (:mod:`.trainer`), ``verify`` (:mod:`.verify` builds its inputs), ``compare``,
``plan``. The trainer builds its workload (:mod:`.workload`: the demo GPT in :mod:`.models`, the
corpus in :mod:`.data`), writes the run folder (:mod:`.runlog`, :mod:`.progress`), checkpoints
(:mod:`.checkpoint`, :mod:`.runstate`) and runs under torchrun (:mod:`.launch`).
"""
