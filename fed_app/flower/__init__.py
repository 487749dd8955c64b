"""How the server and the clients talk, and what each side does with a message.

federation (messages out to the nodes, replies back, retries, bytes), wire (what travels, named once),
transport (inside the message or as a /dev/shm file), mask_plan (each partition's mask), loaded_task (a run's
task loaded once per process, used by both apps).
"""
