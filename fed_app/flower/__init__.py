"""How the server and the clients talk, and what each side does with a message.

federation (messages out to the nodes, replies back, retries, bytes), payload (what travels, named once, and how:
inside the message or as a /dev/shm file), mask_plan (each partition's mask, and masks as bits), loaded_task (a
run's task loaded once per process, used by both apps).
"""
