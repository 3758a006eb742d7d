"""`livetalk serve-local`: a real-time avatar server. protocol (the WebSocket API), live (a session's
timeline, turns and playout clock), engine (the model thread), connection (one WebSocket), app
(ASGI app and runners), webrtc (browser media), responders (what the avatar says), client (Python)."""
