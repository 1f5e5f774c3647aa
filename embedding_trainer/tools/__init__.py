"""Tools shared by the command line, the toy world, the tests and the benchmarks: tiny models, the CLIP vocabulary,
labelled drawing, rendering with an embedding, and the A1111 checkpoint exporter. They use the core (and diffusers
where a model is built); the core never imports them, and they never import the front ends or the toy world."""
