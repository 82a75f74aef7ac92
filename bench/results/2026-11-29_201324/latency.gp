set terminal png size 1200,600 font ',11'
set output 'latency.png'
set title 'One-way latency through two gateways at 5000 packets/s (percentiles)'
set style data histogram
set style histogram clustered gap 1
set style fill solid 0.8 border -1
set logscale y
set ylabel 'microseconds'
set grid ytics
set key top left
set xtics rotate by -20
plot 'latency.dat' using 2:xtic(1) title 'p50', '' using 3 title 'p90', '' using 4 title 'p99', '' using 5 title 'p99.9'
