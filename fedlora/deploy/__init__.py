"""All of deployment in one place: the plan (node folders, keys, registry, certificates), the
Flower command lines, a device's facts and safe settings, starting and stopping the tier processes
with TLS and node authentication, the END device launcher, and the spool an edge's relay and
service share. See the README's "Deployment" section."""
