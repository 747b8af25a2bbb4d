"""raypress serving: the Ray Serve application (import it as `serve.app`)."""
