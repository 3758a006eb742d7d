"""What render, bench, the distill report and serving share: the per-block sequence
(`stream.AvatarStream`), the block scheduler (`scheduler.stream_video`), the VAE stream
(`vae_stream.VAEStream`), a bounded live-audio buffer (`audio_buffer.AudioBuffer`) and the live
session built from them (`session.AvatarSession`)."""
