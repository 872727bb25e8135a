"""The gRPC edge: servicers, error mapping and server construction. Nothing imports it."""
