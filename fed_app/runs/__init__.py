"""A run on disk and its one loop: whatever trains it (centralized or federated).

rundir (config, rows, checkpoint, masks, DONE), files (each written whole and fsynced, read weights-only),
run_loop (restore or step 0, each step a row and a checkpoint), divergence (the guard's rule), claims (one owner
per run), procfs (what /proc says of a process: whether an owner lives), hooks (side concerns called by the loop:
curves, a clean-up at the end), trackers (TensorBoard, W&B: hooks), profile (where a round's time went: a hook,
and the ServerApp's stage marks), plots (curves.png).
"""
