"""lm-eval task templates shipped with the project (`fl_heldout_mc.yaml`, `fl_heldout_gen.yaml`).

They read ``heldout.jsonl``; `fl.app.eval.records.write_tasks` copies them next to a run's held-out records with
``data_files`` set to that file's absolute path (the folder `lm_eval --include_path` reads).
"""
