"""Media inputs (audio, images) turned into what the model's encoders read."""
