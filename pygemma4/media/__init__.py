"""Media inputs of multimodal chats, decoded and prepared as the model's processor does."""
