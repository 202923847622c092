"""Files in and out: safetensors checkpoints (parsing, validation, sharded indexes), Hub
resolution, PEFT adapter reading and the one atomic writer. No model is ever loaded here."""
