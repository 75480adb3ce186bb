"""The spine of the framework: config, models and adapters, data, wire format, Flower apps, outputs."""
