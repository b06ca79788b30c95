"""Decoding modes over prompt sets, side by side: a run's configuration (`config`), its engines
(`engines`), the interleaved runs (`runs`) and the comparison they make (`compare`)."""
